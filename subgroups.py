"""Who the model fails: the evaluation by sex and by age band, with patient-level intervals.

For sex (female, male) and age bands (0-20, 20-40, 40-60, 60-80, 80+ years, CheXclusion's;
a band holds [low, high)), per disease and subgroup: images, patients, positives, prevalence,
AUROC, and the TPR (sensitivity) and FPR (1 - specificity) at the operating thresholds chosen
on val, each with a 95% bootstrap interval that resamples patients; and the gap: the subgroup's
TPR (FPR) minus that of everyone else whose attribute is known, with a *paired* interval (both
sides scored on the same resampled patients), flagged where it excludes 0. A statistic resting
on fewer than MIN_COUNT positives (negatives for FPR), or on positives (negatives) of fewer
than MIN_COUNT patients, in the subgroup or in the rest, is n/a with the reason, never a
number. Near 0 and 1 a percentile bootstrap collapses (14 of 14 resamples to [1, 1]), so a rate's
interval is never narrower than Wilson's score interval on its patients, nor a gap's than
Newcombe's interval from the two sides' Wilson intervals (metrics.at_least). Many gaps are
tested at once: the report and stdout say how many of them 5% would flag by chance alone.

Demographics, looked up by image name (or, for MIMIC, by the subject in the name):
    ChestX-ray14   the label table's `Patient Age`, `Patient Gender` (both revisions)
    CheXpert       train.csv / valid.csv `Sex`, `Age`
    MIMIC-CXR-JPG  MIMIC-IV's `patients` table (subject_id, gender, anchor_age): --patients-table
A blank, unreadable or impossible value (an age below 0 or over MAX_AGE, such as the few ages
over 100 of the 2017 NIH table that its 2020 revision corrects; a sex code other than
F/M/Female/Male) and an image without a table row are "unknown": counted in one line of the
report, shown in their own row, and left out of every gap.

numpy and scikit-learn (through metrics.py), matplotlib for the figure; no torch.
"""
from pathlib import Path

import numpy as np

from common import DataError, atomic_path, one_line
from labels import patient_of
from metrics import (at_least, auc_collapsed, bootstrap_counts, interval, newcombe, quiet,
                     roc_aucs, weighted_aucs, wilson)
from optional import MissingPackage, pyplot
from tables import detect_dataset, find_label_table, read_chexpert, read_table

SEXES = ("female", "male")
AGE_BANDS = ((0, 20, "0-20"), (20, 40, "20-40"), (40, 60, "40-60"), (60, 80, "60-80"),
             (80, None, "80+"))
ATTRIBUTES = {"sex": SEXES, "age": tuple(b[2] for b in AGE_BANDS)}
UNKNOWN = "unknown"
MAX_AGE = 110  # years; above it (or below 0) an age is impossible, hence unknown
MIN_COUNT = 10  # positives (TPR) or negatives (FPR) below which a statistic is n/a
SEX_CODES = {"f": "female", "female": "female", "m": "male", "male": "male"}
UNKNOWN_SEX_CODES = {"unknown", "u"}  # recorded as not known (CheXpert's "Unknown")


# ---------------------------------------------------------------------------------------------
# Demographics

class Demographics:
    """Sex and age per image (key 'image') or per patient (key 'patient', MIMIC), each a
    (value or None, why unknown) pair, from the table named by `source`."""

    def __init__(self, source, key, sex, age):
        self.source, self.key, self.sex, self.age = str(source), key, sex, age

    def assign(self, names):
        """{'sex': (N,) subgroup names, 'age': (N,) band names} (UNKNOWN where not known) and
        one line counting the unknown values by reason."""
        if self.key == "patient":
            keys = [patient_of(n) for n in names]
        else:
            keys = list(names)
        missing = (None, "no row in the table")
        sex = [self.sex.get(k, missing) for k in keys]
        age = [self.age.get(k, missing) for k in keys]
        groups = {"sex": np.array([s if s is not None else UNKNOWN for s, _ in sex], dtype=object),
                  "age": np.array([age_band(a) for a, _ in age], dtype=object)}
        parts = []
        for attr, values in (("sex", sex), ("age", age)):
            reasons = {}
            for v, why in values:
                if v is None:
                    reasons[why] = reasons.get(why, 0) + 1
            n = sum(reasons.values())
            ordered = sorted(reasons.items(), key=lambda x: (-x[1], x[0]))  # most first
            detail = ", ".join(f"{c} {w}" for w, c in ordered)
            parts.append(f"{attr} unknown for {n}" + (f" ({detail})" if n else ""))
        note = (f"demographics from {self.source}: of {len(names)} images, " + "; ".join(parts)
                + ("; unknown values are their own row and left out of every gap"
                   if any(v[0] is None for v in sex + age) else ""))
        return groups, note


def age_band(age):
    if age is None:
        return UNKNOWN
    for low, high, name in AGE_BANDS:
        if age >= low and (high is None or age < high):
            return name
    return UNKNOWN


def parse_sex(text):
    """(female|male|None, why unknown)."""
    code = str(text).strip().lower()
    if not code:
        return None, "blank"
    if code in SEX_CODES:
        return SEX_CODES[code], None
    if code in UNKNOWN_SEX_CODES:
        return None, "recorded as unknown"
    return None, "unrecognised code"


def parse_age(text):
    """(years or None, why unknown). Whole years ('58'), or NIH's first release's '058Y' (also
    M months, D days); negative or over MAX_AGE is impossible."""
    code = str(text).strip().upper()
    if not code:
        return None, "blank"
    scale = {"Y": 1.0, "M": 1 / 12, "D": 1 / 365.25}.get(code[-1])
    if scale is not None:
        code = code[:-1]
    try:
        years = float(code) * (scale or 1.0)
    except ValueError:
        return None, "not a number"
    if not np.isfinite(years):
        return None, "not a number"
    if years < 0 or years > MAX_AGE:
        return None, f"outside 0-{MAX_AGE}"
    return years, None


def _table(path, needed, what):
    """The table's columns as strings, or None when it lacks a needed one (no demographics)."""
    table = read_table(path, [], what)
    if any(c not in table.columns for c in needed):
        return None
    return table


def _parse(keys, sexes, ages, path, what):
    sex, age = {}, {}
    for row, (k, s, a) in enumerate(zip(keys, sexes, ages), 2):
        if k in sex:
            raise DataError(f"{path}:{row}: {what} {k!r} is listed twice")
        sex[k], age[k] = parse_sex(s), parse_age(a)
    return sex, age


def nih_demographics(data_dir):
    """From NIH's label table (either revision), or None without one / without the columns."""
    try:
        path = find_label_table(data_dir)
    except DataError:
        return None
    table = _table(path, ["Image Index", "Patient Age", "Patient Gender"], "label table")
    if table is None:
        return None
    sex, age = _parse(table["Image Index"].str.strip(), table["Patient Gender"],
                      table["Patient Age"], path, "image")
    return Demographics(path, "image", sex, age)


def chexpert_demographics(data_dir):
    """From CheXpert's train.csv and valid.csv `Sex` and `Age`, keyed by the image names the
    lists use (read_chexpert's, laterals included, in file order)."""
    parts = read_chexpert(data_dir, keep_laterals=True)
    sex, age = {}, {}
    for part, (names, _, _) in parts.items():
        path = Path(data_dir) / part
        table = _table(path, ["Sex", "Age"], part)
        if table is None:
            return None
        s, a = _parse(names, table["Sex"], table["Age"], path, "image")
        sex.update(s)
        age.update(a)
    return Demographics(f"{Path(data_dir) / 'train.csv'} and valid.csv", "image", sex, age)


def mimic_demographics(path):
    """From MIMIC-IV's patients table (subject_id, gender, anchor_age): the age in the
    patient's anchor year (MIMIC-IV gives no age per study; over 89 it reads 91)."""
    if not Path(path).is_file():
        raise DataError(f"--patients-table {path}: not found (MIMIC-IV's hosp/patients.csv.gz)")
    table = read_table(path, ["subject_id", "gender", "anchor_age"], "MIMIC-IV patients table")
    ids = table["subject_id"].str.strip()
    bad = ~ids.str.fullmatch(r"\d{1,18}")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}:{row + 2}: subject_id {table['subject_id'].iloc[row]!r} is "
                        "not a number")
    sex, age = _parse(ids.astype(np.int64).tolist(), table["gender"], table["anchor_age"], path,
                      "subject_id")
    return Demographics(path, "patient", sex, age)


def load_demographics(data_dir, patients_table=None, dataset=None):
    """(Demographics or None, why none). Bad tables are a DataError; a data set without
    demographics is None with the reason. dataset: the kind of data set data_dir holds, where
    the caller knows it (splitting.Data.dataset); detected otherwise."""
    if dataset is None:
        dataset = detect_dataset(data_dir) if data_dir and Path(data_dir).is_dir() else "nih"
    if patients_table is not None and dataset != "mimic":
        raise DataError(f"--patients-table: MIMIC-IV's patients table is for MIMIC-CXR; "
                        f"{data_dir} is {dataset}")
    if dataset == "mimic":
        if patients_table is None:
            return None, ("MIMIC-CXR has no demographics of its own: pass --patients-table "
                          "with MIMIC-IV's patients table (hosp/patients.csv.gz)")
        return mimic_demographics(patients_table), None
    found = chexpert_demographics(data_dir) if dataset == "chexpert" else nih_demographics(data_dir)
    if found is None:
        what = ("train.csv/valid.csv with Sex and Age" if dataset == "chexpert"
                else "a label table with Patient Age and Patient Gender")
        return None, f"no demographics in {data_dir} ({what})"
    return found, None


# ---------------------------------------------------------------------------------------------
# The statistics

def _stat(value, lo, hi, why=None):
    if why is not None or value is None or not np.isfinite(value):
        return {"value": None, "why": why or "undefined"}
    ci = [None if not np.isfinite(v) else float(v) for v in (lo, hi)]
    return {"value": float(value), "ci": ci}


def _gap(value, lo, hi, why=None):
    out = _stat(value, lo, hi, why)
    if out["value"] is not None:
        ok = out["ci"][0] is not None
        out["flagged"] = bool(ok and (out["ci"][0] > 0 or out["ci"][1] < 0))
    return out


def _few(n, what, who="", min_count=MIN_COUNT, patients=None):
    """Why n images (of `patients` patients) of one class are too few, or None where both
    reach min_count: '3 positives, fewer than 10', '14 positives of 1 patient, fewer than 10
    patients' (what: 'positive' or 'negative')."""
    n = int(n)
    if n < min_count:
        return f"{who}{n} {what}{'' if n == 1 else 's'}" + (f", fewer than {min_count}"
                                                             if n else "")
    if patients is not None and patients < min_count:
        patients = int(patients)
        return (f"{who}{n} {what}s of {patients} patient{'' if patients == 1 else 's'}, fewer "
                f"than {min_count} patients")
    return None


def subgroup_statistics(labels, probs, patients, assigned, thresholds=None, n_boot=2000, seed=0,
                        class_names=None, min_count=MIN_COUNT):
    """The subgroup section as a JSON-ready dict.

    labels [N, K] 0/1 (NaN: uncertain, left out of that disease), probs [N, K], patients (N,)
    the bootstrap groups, assigned {attribute: (N,) subgroup names, UNKNOWN where unknown},
    thresholds {rule: [K]} chosen on val (None: no TPR/FPR). One pass of metrics'
    patient-level resamples serves every attribute, subgroup, disease and rule."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    n, k = labels.shape
    class_names = list(class_names) if class_names is not None else [str(d) for d in range(k)]
    thresholds = {r: np.asarray(t, dtype=np.float64) for r, t in (thresholds or {}).items()}
    counted = ~np.isnan(labels)
    y = np.nan_to_num(labels)
    pos, neg = y * counted, (1 - y) * counted
    inverse, resamples = bootstrap_counts(patients, n_boot, seed)
    n_pat = int(inverse.max()) + 1
    layout = {}
    for attr, codes in assigned.items():
        codes = np.asarray(codes, dtype=object)
        groups = list(ATTRIBUTES[attr]) + ([UNKNOWN] if (codes == UNKNOWN).any() else [])
        index = {g: i for i, g in enumerate(groups)}
        code = np.array([index.get(c, index.get(UNKNOWN, -1)) for c in codes])
        if (code < 0).any():
            raise ValueError(f"{attr}: subgroup {codes[code < 0][0]!r} is not one of {groups}")
        layout[attr] = (groups, code)

    def per_patient(values, code, s):
        """(G, S*K): each patient's sum of `values` [N, K] in each subgroup."""
        flat = inverse * s + code
        return np.stack([np.bincount(flat, values[:, d], minlength=n_pat * s)
                         for d in range(k)], 1).reshape(n_pat, s * k)

    # Point values and the per-patient counts that a resample turns into its counts.
    sums, boot = {}, {}
    for attr, (groups, code) in layout.items():
        s = len(groups)
        parts = {"pos": pos, "neg": neg}
        for rule, t in thresholds.items():
            decided = (probs >= t[None]).astype(np.float64)
            parts[f"tp/{rule}"], parts[f"fp/{rule}"] = pos * decided, neg * decided
        sums[attr] = {name: per_patient(v, code, s) for name, v in parts.items()}
        boot[attr] = {name: [] for name in parts}
        boot[attr]["auc"] = []
    # patients whose images hold a positive (negative) of each disease, per subgroup, and in
    # everyone else whose attribute is known (a patient counted once, though their images lie
    # in several age bands): a patient-level statistic needs min_count of them as well as
    # min_count images
    with_patients, rest_with_patients = {}, {}
    for attr, (groups, code) in layout.items():
        known = len(ATTRIBUTES[attr])
        with_patients[attr], rest_with_patients[attr] = {}, {}
        for name in ("pos", "neg"):
            has = sums[attr][name].reshape(n_pat, len(groups), k) > 0  # (patient, group, d)
            with_patients[attr][name] = has.sum(0)
            rest_with_patients[attr][name] = np.stack([
                np.delete(has[:, :known], g, axis=1).any(1).sum(0) if g < known
                else np.zeros(k, int) for g in range(len(groups))])
    # AUROC of each subgroup where both classes reach min_count, resampled with the rest.
    auc_point, auc_ok, members = {}, {}, {}
    for attr, (groups, code) in layout.items():
        members[attr] = [np.flatnonzero(code == g) for g in range(len(groups))]
        point = np.full((len(groups), k), np.nan)
        ok = np.zeros((len(groups), k), bool)
        for g in range(len(groups)):
            inside = code == g
            if inside.any():
                point[g] = roc_aucs(labels[inside], probs[inside])
            ok[g] = ((pos[inside].sum(0) >= min_count) & (neg[inside].sum(0) >= min_count)
                     & (with_patients[attr]["pos"][g] >= min_count)
                     & (with_patients[attr]["neg"][g] >= min_count) & np.isfinite(point[g]))
        auc_point[attr], auc_ok[attr] = point, ok
    for w in resamples:
        for attr, (groups, code) in layout.items():
            for name, m in sums[attr].items():
                boot[attr][name].append((w @ m).reshape(len(w), len(groups), k))
            block = np.full((len(w), len(groups), k), np.nan)
            for g, d in zip(*np.nonzero(auc_ok[attr])):
                inside = members[attr][g]
                block[:, g, d] = weighted_aucs(labels[inside, d], probs[inside, d], w,
                                               inverse[inside])
            boot[attr]["auc"].append(block)

    out = {"min_count": min_count, "rules": list(thresholds), "attributes": {}}
    for attr, (groups, code) in layout.items():
        known_groups = len(ATTRIBUTES[attr])
        b = {name: np.concatenate(v) for name, v in boot[attr].items()}
        total = {name: m.reshape(n_pat, len(groups), k).sum(0) for name, m in sums[attr].items()}
        rest_total = {name: t[:known_groups].sum(0)[None] - t for name, t in total.items()}
        rest_boot = {name: v[:, :known_groups].sum(1)[:, None] - v for name, v in b.items()
                     if name != "auc"}
        # patients of each side's denominator (everyone else's: the other known subgroups')
        here_patients, rest_patients = with_patients[attr], rest_with_patients[attr]
        with quiet():
            rates, rate_ci, gaps, gap_ci = {}, {}, {}, {}
            for rule in thresholds:
                for stat, num, den in (("tpr", "tp", "pos"), ("fpr", "fp", "neg")):
                    key = (rule, stat)
                    rates[key] = total[f"{num}/{rule}"] / total[den]
                    score = wilson(rates[key], here_patients[den])
                    rate_ci[key] = at_least(interval(b[f"{num}/{rule}"] / b[den]), score)
                    rest = rest_total[f"{num}/{rule}"] / rest_total[den]
                    gaps[key] = rates[key] - rest
                    gap_ci[key] = at_least(
                        interval(b[f"{num}/{rule}"] / b[den]
                                 - rest_boot[f"{num}/{rule}"] / rest_boot[den]),
                        newcombe(rates[key], score, rest, wilson(rest, rest_patients[den])))
        auc_lo, auc_hi = auc_collapsed(interval(b["auc"]), auc_point[attr],
                                       here_patients["pos"], here_patients["neg"])
        images = np.bincount(code, minlength=len(groups))
        patients = [len(np.unique(inverse[code == g])) for g in range(len(groups))]
        per_disease = {}
        for d, disease in enumerate(class_names):
            rows = {}
            for g, group in enumerate(groups):
                inside = code == g
                p, q = total["pos"][g, d], total["neg"][g, d]
                rp, rq = rest_total["pos"][g, d], rest_total["neg"][g, d]
                counted_here = inside & counted[:, d]
                row = {"images": int(p + q), "patients": int(len(np.unique(inverse[counted_here]))),
                       "positives": int(p), "prevalence": float(p / (p + q)) if p + q else None}
                pp, pq = here_patients["pos"][g, d], here_patients["neg"][g, d]
                rpp, rpq = rest_patients["pos"][g, d], rest_patients["neg"][g, d]
                if auc_ok[attr][g, d]:
                    row["auc"] = _stat(auc_point[attr][g, d], auc_lo[g, d], auc_hi[g, d])
                else:
                    why = (_few(p, "positive", min_count=min_count, patients=pp) or
                           _few(q, "negative", min_count=min_count, patients=pq) or "undefined")
                    row["auc"] = {"value": None, "why": why}
                row["at"] = {}
                for rule, t in thresholds.items():
                    entry = {"threshold": None if np.isnan(t[d]) else float(t[d])}
                    for stat, here, there, here_p, there_p, what in (
                            ("tpr", p, rp, pp, rpp, "positive"), ("fpr", q, rq, pq, rpq, "negative")):
                        key = (rule, stat)
                        why = ("no threshold chosen on val" if np.isnan(t[d]) else
                               _few(here, what, min_count=min_count, patients=here_p))
                        entry[stat] = _stat(rates[key][g, d], *(c[g, d] for c in rate_ci[key]),
                                            why)
                        if g >= known_groups:
                            gwhy = f"{UNKNOWN} {attr}: not a subgroup"
                        elif why is not None:
                            gwhy = why
                        else:
                            gwhy = _few(there, what, "everyone else: ", min_count, there_p)
                        entry[f"{stat}_gap"] = _gap(gaps[key][g, d],
                                                    *(c[g, d] for c in gap_ci[key]), gwhy)
                    row["at"][rule] = entry
                rows[group] = row
            per_disease[disease] = rows
        out["attributes"][attr] = {
            "groups": groups,
            "images": {g: int(images[i]) for i, g in enumerate(groups)},
            "patients": {g: int(patients[i]) for i, g in enumerate(groups)},
            "diseases": per_disease}
    return out


def subgroup_section(names, labels, probs, patients, demographics, thresholds=None, n_boot=2000,
                     seed=0, class_names=None, chosen_on=None):
    """The report's `subgroups` entry: the statistics, where the demographics came from and the
    one line counting the unknown values."""
    assigned, note = demographics.assign(names)
    section = subgroup_statistics(labels, probs, patients, assigned, thresholds, n_boot, seed,
                                  class_names)
    section.update({"source": demographics.source, "note": note,
                    "band": "an age band holds [low, high) years",
                    "gap": "the subgroup's rate minus that of everyone else whose attribute is "
                           "known; paired patient-level bootstrap",
                    "thresholds": chosen_on if thresholds else None})
    return section


# ---------------------------------------------------------------------------------------------
# Text

def _fmt(stat, digits=3):
    if stat["value"] is None:
        return f"n/a ({stat['why']})"
    lo, hi = stat["ci"]
    ci = "[n/a]" if lo is None else f"[{lo:.{digits}f}, {hi:.{digits}f}]"
    text = f"{stat['value']:.{digits}f} {ci}"
    if "flagged" in stat:
        text = f"{stat['value']:+.{digits}f} {ci}"
        if stat["flagged"]:
            text = f"**{text}**"
    return text


def markdown_section(section, rule="youden"):
    """The report's subgroup tables, one per attribute."""
    lines = ["", "## Subgroups", "", section["note"] + ".", ""]
    has_rule = rule in section["rules"]
    if has_rule:
        lines.append(f"TPR and FPR at the {RULE_NAMES.get(rule, rule)} thresholds chosen on val "
                     f"({section['thresholds']}); gap: {section['gap']}, **bold** where its "
                     f"95% interval excludes 0 ({family_note(section, rule)}). A rate's "
                     "interval is never narrower than Wilson's on its patients, a gap's than "
                     "Newcombe's. n/a: fewer than "
                     f"{section['min_count']} positives (negatives for FPR), or positives of "
                     f"fewer than {section['min_count']} patients, in the subgroup or in "
                     "everyone else. Age bands: [low, high) years.")
    else:
        lines.append("No operating points: TPR and FPR need thresholds chosen on val "
                     "(`python infer.py --part val`, or `report.py --val-predictions`).")
    cols = ["Disease", "Subgroup", "Images", "Patients", "Positives", "Prevalence",
            "AUROC (95% CI)"]
    if has_rule:
        cols += ["TPR (95% CI)", "TPR gap (95% CI)", "FPR (95% CI)", "FPR gap (95% CI)"]
    for attr, a in section["attributes"].items():
        lines += ["", f"### By {attr}", "",
                  "; ".join(f"{g}: {a['images'][g]} images, {a['patients'][g]} patients"
                            for g in a["groups"]) + ".", "",
                  f"| {' | '.join(cols)} |", "|" + " --- |" * len(cols)]
        for disease, rows in a["diseases"].items():
            for group, r in rows.items():
                prev = "n/a" if r["prevalence"] is None else f"{r['prevalence']:.3f}"
                cells = [disease, group, str(r["images"]), str(r["patients"]), str(r["positives"]),
                         prev, _fmt(r["auc"])]
                if has_rule:
                    at = r["at"][rule]
                    cells += [_fmt(at["tpr"]), _fmt(at["tpr_gap"]), _fmt(at["fpr"]),
                              _fmt(at["fpr_gap"])]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def family_note(section, rule="youden", stats=("tpr", "fpr")):
    """How many gaps (of `stats`) were tested and flagged, beside how many 5% of them would
    flag by chance alone (each interval is 95%; no adjustment for the many comparisons)."""
    tested = sum(1 for a in section["attributes"].values() for rows in a["diseases"].values()
                 for r in rows.values() for stat in stats
                 if r["at"].get(rule) and r["at"][rule][f"{stat}_gap"]["value"] is not None)
    found = len([f for f in flagged(section, rule) if f[3] in stats])
    kind = " and ".join(stat.upper() for stat in stats)
    if not tested:
        return f"no {kind} gap could be tested (too few positives or patients)"
    return (f"{found} of {tested} {kind} gaps tested are flagged; with no real gap at all, about "
            f"{0.05 * tested:.1f} would be by chance alone (5% of {tested}: each interval is "
            "95%, not adjusted for the many comparisons)")


def flagged(section, rule="youden"):
    """[(attribute, disease, subgroup, 'tpr'|'fpr', gap stat)] whose interval excludes 0."""
    out = []
    for attr, a in section["attributes"].items():
        for disease, rows in a["diseases"].items():
            for group, r in rows.items():
                at = r["at"].get(rule)
                for stat in ("tpr", "fpr"):
                    if at and at[f"{stat}_gap"].get("flagged"):
                        out.append((attr, disease, group, stat, at[f"{stat}_gap"]))
    return out


def summary_lines(section, rule="youden", most=8):
    """A few lines for stdout: the note and the flagged TPR/FPR gaps."""
    lines = [section["note"]]
    if rule not in section["rules"]:
        return lines + ["subgroups: AUROC only; the TPR/FPR gaps need thresholds chosen on val "
                        "(the test report applies them)"]
    found = flagged(section, rule)
    lines.append(f"subgroup gaps whose 95% interval excludes 0 ({RULE_NAMES.get(rule, rule)} "
                 f"thresholds): {family_note(section, rule)}" + (":" if found else ""))
    for attr, disease, group, stat, g in sorted(found, key=lambda x: -abs(x[4]["value"]))[:most]:
        text = _fmt(g).replace("**", "")
        lines.append(f"  {disease:<20}{attr} {group:<8}{stat.upper()} gap {text}")
    if len(found) > most:
        lines.append(f"  ... {len(found) - most} more in the report")
    return lines


# ---------------------------------------------------------------------------------------------
# The figure

RULE_NAMES = {"youden": "Youden", "f1": "best-F1", "sensitivity": "target-sensitivity"}
COLORS = {"female": "#c2185b", "male": "#1565c0", "0-20": "#2e7d32", "20-40": "#f9a825",
          "40-60": "#ef6c00", "60-80": "#6a1b9a", "80+": "#000000"}
MARKERS = {"female": "o", "male": "s", "0-20": "v", "20-40": "^", "40-60": "D", "60-80": "s",
           "80+": "o"}


def write_figure(path, section, rule="youden", notice=None):
    """Per disease, each subgroup's TPR gap with its 95% interval, one panel per attribute
    (CheXclusion's figure). Filled: interval excludes 0; open: it does not; x at the bottom:
    n/a. notice: a line under the title (the sample model's). Returns the path, or None
    without matplotlib or thresholds."""
    if rule not in section["rules"]:
        return None
    try:
        plt = pyplot("the subgroup figure")
    except MissingPackage:
        return None
    from matplotlib.lines import Line2D
    attrs = list(section["attributes"])
    diseases = list(next(iter(section["attributes"].values()))["diseases"]) if attrs else []
    fig, axes = plt.subplots(len(attrs), 1, figsize=(max(8, 0.75 * len(diseases) + 2),
                                                     3.6 * len(attrs)),
                             squeeze=False, layout="constrained")
    for ax, attr in zip(axes[:, 0], attrs):
        a = section["attributes"][attr]
        groups = [g for g in a["groups"] if g != UNKNOWN]
        width = 0.8 / len(groups)
        ax.axhline(0, color="0.3", lw=1, ls="--", zorder=1)
        na = plotted = False
        for j, group in enumerate(groups):
            for d, disease in enumerate(diseases):
                x = d - 0.4 + width * (j + 0.5)
                g = a["diseases"][disease][group]["at"][rule]["tpr_gap"]
                color = COLORS.get(group, "k")
                if g["value"] is None:
                    ax.plot(x, 0.03, "x", color=color, ms=5, transform=ax.get_xaxis_transform(),
                            zorder=3)
                    na = True
                    continue
                plotted = True
                lo, hi = g["ci"]
                if lo is not None:
                    ax.plot([x, x], [lo, hi], color=color, lw=1.4, zorder=2)
                ax.plot(x, g["value"], MARKERS.get(group, "o"), ms=6, color=color,
                        mfc=color if g.get("flagged") else "white", zorder=3)
        if not plotted:
            ax.set_ylim(-0.5, 0.5)
            ax.text(0.5, 0.6, f"every gap n/a: fewer than {section['min_count']} positives (or "
                    "their patients) in the subgroup or in everyone else",
                    transform=ax.transAxes, ha="center", color="0.3")
        if na:  # a strip of its own at the foot of the panel: an n/a is no value on the y axis
            strip = ax.get_xaxis_transform()
            ax.fill_between([-0.6, len(diseases) - 0.4], 0, 0.07, transform=strip, color="0.92",
                            zorder=0, lw=0)
            ax.text(-0.58, 0.035, "n/a", transform=strip, fontsize=7, va="center", color="0.35")
        ax.set_xticks(range(len(diseases)))
        ax.set_xticklabels(diseases, rotation=35, ha="right")
        ax.set_xlim(-0.6, len(diseases) - 0.4)
        for d in range(1, len(diseases)):
            ax.axvline(d - 0.5, color="0.9", lw=0.6, zorder=0)
        ax.set_ylabel("TPR gap\n(subgroup - everyone else)")
        ax.set_title(f"By {attr}" + (" (years)" if attr == "age" else ""), loc="left")
        handles = [Line2D([], [], marker=MARKERS.get(g, "o"), color=COLORS.get(g, "k"), ls="-",
                          ms=6, label=g) for g in groups]
        handles += [Line2D([], [], marker="o", color="0.3", mfc="white", ls="", ms=6,
                           label="interval covers 0"),
                    Line2D([], [], marker="o", color="0.3", ls="", ms=6,
                           label="interval excludes 0")]
        if na:
            handles.append(Line2D([], [], marker="x", color="0.3", ls="", ms=5,
                                  label="n/a: too few positives or patients"))
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  frameon=False)
    fig.suptitle(f"True-positive-rate gap of each subgroup at the {RULE_NAMES.get(rule, rule)} "
                 "thresholds chosen on val (95% intervals: patient-level bootstrap, at least "
                 f"Newcombe's)\n{family_note(section, rule, ('tpr',))}"
                 + (f"\n{notice}" if notice else ""), fontsize=11)
    with atomic_path(path, "figure") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def add_subgroup_args(parser):
    """The flags infer.py and report.py share."""
    parser.add_argument("--no-subgroups", action="store_true",
                        help="leave the subgroup section (sex, age bands) out of the report")
    parser.add_argument("--patients-table", default=None, metavar="CSV",
                        help="MIMIC-CXR: MIMIC-IV's patients table (hosp/patients.csv.gz: "
                             "subject_id, gender, anchor_age) for the subgroup section")


def demographics_for(data_dir, no_subgroups=False, patients_table=None, log=print, dataset=None):
    """What a script passes on: the Demographics, or None (with a note why) when the section
    is off or the data set has none. Read before anything expensive: a bad table stops here.
    dataset: as load_demographics's."""
    if no_subgroups:
        if patients_table is not None:
            raise DataError("--patients-table: not used with --no-subgroups")
        return None
    try:
        found, why = load_demographics(data_dir, patients_table, dataset)
    except MissingPackage as e:  # a box that installed less: the report without the section
        found, why = None, one_line(e)
    except DataError as e:
        raise DataError(f"subgroups: {one_line(e)} (or pass --no-subgroups)") from None
    if found is None:
        log(f"note: no subgroup section: {why}")
    return found
