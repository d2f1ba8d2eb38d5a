#!/usr/bin/env bash
# Fetch NIH ChestX-ray14 into a data directory: the 12 image archives (about 42 GB), verified
# against their SHA-256 sums and extracted to DIR/images/, next to the label table this
# repository ships. Resumable and safe to run twice.
#
#   bash batch_download.sh [DIR] [options]          DIR defaults to data/
#     --first N          only the first N archives (a quick start; run again for the rest)
#     --jobs N           parallel downloads (default 3)
#     --delete-archives  delete each archive once it is verified and extracted
#     --mirror URL       fetch URL/images_01.tar.gz ... instead of NIH's links (or $CHEXNET_MIRROR)
#     --list FILE        the archive list (default nih/downloads.tsv: name, url, sha256, images)
#     --no-space-check   skip the free-disk-space check
# A failed request is retried 5 times, CHEXNET_RETRY_DELAY (2) x attempt seconds apart.
# State lives in DIR/.download/: NAME.part (partial download, continued on the next run),
# NAME (complete), NAME.verified (checksum matched), NAME.extracted (all of it in images/).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prog=batch_download.sh

die() { echo "error: $*" >&2; exit 2; }
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

dir=data first=0 jobs=3 delete=0 space_check=1
mirror=${CHEXNET_MIRROR:-}
list="$here/nih/downloads.tsv"
while [ $# -gt 0 ]; do
    case "$1" in
        --first) [ $# -ge 2 ] || die "--first needs a number"; first=$2; shift 2 ;;
        --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; jobs=$2; shift 2 ;;
        --delete-archives) delete=1; shift ;;
        --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; mirror=$2; shift 2 ;;
        --list) [ $# -ge 2 ] || die "--list needs a file"; list=$2; shift 2 ;;
        --no-space-check) space_check=0; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) dir=$1; shift ;;
    esac
done
[[ $first =~ ^[0-9]{1,6}$ ]] || die "--first $first: not a number"
[[ $jobs =~ ^[1-9][0-9]{0,1}$ ]] || die "--jobs $jobs: not a number from 1 to 99"
[ -f "$list" ] || die "$list: archive list not found"
for tool in curl sha256sum python3 df; do
    command -v $tool >/dev/null || die "needs $tool"
done

# The archives to fetch: "name url sha256 images" per line after the header, every field
# checked before any work (names become file names; CRLF line ends are tolerated).
archives=
line_no=0 total_archives=0
declare -A seen_name=()
while IFS= read -r line || [ -n "$line" ]; do
    line_no=$((line_no + 1))
    line=${line%$'\r'}
    [ "$line_no" = 1 ] && continue  # header
    [ -z "${line//[[:space:]]/}" ] && continue
    IFS=$'\t' read -r name url sha count extra <<< "$line"
    where="$list:$line_no"
    [ -n "$count" ] || die "$where: expected 4 tab-separated fields (archive, url, sha256, images)"
    [ -z "$extra" ] || die "$where: more than 4 fields"
    [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*\.(tar\.gz|tgz)$ ]] \
        || die "$where: archive name '$name' is not a plain file name ending in .tar.gz"
    [[ $url =~ ^https?://[^[:space:]]+$ ]] || die "$where: '$url' is not an http(s) URL"
    [[ $sha =~ ^[0-9a-fA-F]{64}$ ]] || die "$where: '$sha' is not a SHA-256 (64 hex digits)"
    [[ $count =~ ^[1-9][0-9]{0,8}$ ]] || die "$where: image count '$count' is not a positive number"
    [ -z "${seen_name[$name]:-}" ] || die "$where: archive $name is listed twice"
    seen_name[$name]=1
    total_archives=$((total_archives + 1))
    archives+="$name $url ${sha,,} $count"$'\n'
done < "$list"
[ "$total_archives" -gt 0 ] || die "$list: no archives listed"
archives=${archives%$'\n'}
if [ "$first" -gt 0 ]; then
    archives=$(printf '%s\n' "$archives" | head -n "$first")
fi
selected=$(printf '%s\n' "$archives" | grep -c .)

mkdir -p "$dir/images" "$dir/.download"
state="$dir/.download"

# ---- disk space: PNGs hardly compress, so an archive and its images are about the same size
if [ "$space_check" = 1 ]; then
    bytes_per_image=375000  # 42 GB / 112,120 images
    need=0 biggest=0
    while read -r name _ _ count; do
        [ -f "$state/$name.extracted" ] && continue
        size=$((count * bytes_per_image))
        need=$((need + size))
        [ "$size" -gt "$biggest" ] && biggest=$size
        [ "$delete" = 0 ] && need=$((need + size))
    done <<< "$archives"
    [ "$delete" = 1 ] && need=$((need + jobs * biggest))
    free=$(($(df -Pk "$dir" | awk 'NR == 2 { print $4 }') * 1024))
    if [ "$need" -gt "$free" ]; then
        echo "$prog: $dir has $((free / 1000000000)) GB free, about $((need / 1000000000 + 1)) GB needed" \
             "for $selected archive(s); free some space, use --delete-archives or --first N," \
             "or pass --no-space-check" >&2
        exit 1
    fi
fi

# ---- one archive: download (resumable), verify, extract safely --------------------------------
download() {  # url out: continue a partial download; retry transient errors
    local url=$1 out=$2 attempt rc code
    local show=(-sS)
    if [ "$jobs" = 1 ] && [ -t 2 ]; then show=(--progress-bar); fi
    for attempt in 1 2 3 4 5; do
        rc=0
        code=$(curl -fL --connect-timeout 30 --speed-limit 1000 --speed-time 60 -C - "${show[@]}" \
                    -w '%{http_code}' -o "$out" "$url") || rc=$?
        case $rc in
            0) return 0 ;;
            33) rm -f "$out" ;;  # the server cannot resume: start again from zero
            22) # An HTTP error. Only "416 range not satisfiable" on a non-empty file means it
                # is complete (the checksum decides); any other keeps the partial file.
                if [ "$code" = 416 ] && [ -s "$out" ]; then return 0; fi ;;
        esac
        echo "$prog: ${out##*/}: download interrupted (curl exit $rc${code:+, HTTP $code}), retry $attempt of 5" >&2
        sleep $((attempt * ${CHEXNET_RETRY_DELAY:-2}))
    done
    return 1
}

extract() {  # archive name: all members to a staging folder, then the PNGs into images/
    python3 - "$1" "$dir" "$2" <<'PY'
import os, shutil, sys, tarfile, zlib
archive, root, name = sys.argv[1:]
staging = os.path.join(root, ".download", name + ".staging")
shutil.rmtree(staging, ignore_errors=True)  # a partial extraction of an earlier run
def refuse(why):
    shutil.rmtree(staging, ignore_errors=True)
    sys.exit(f"batch_download.sh: {name}: {why}; archive refused, nothing extracted")
with open(archive, "rb") as f:
    magic = f.read(4)
if magic.startswith(b"PK"):
    refuse("is a zip archive, not a tar.gz")
if not magic.startswith(b"\x1f\x8b"):
    refuse("is not a gzip-compressed tar archive")
try:
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.name.startswith("/") or ".." in parts:
                refuse(f"member {member.name!r} would be written outside {root}")
            if not (member.isfile() or member.isdir()):
                refuse(f"member {member.name!r} is a link or special file")
            try:
                tar.extract(member, staging, filter="data")
            except TypeError:  # Python without extraction filters; checked above
                tar.extract(member, staging)
except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    refuse(f"not a readable tar.gz ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
names = set()  # a file name twice (in two folders, or a member repeated) is one image
for folder, _, files in os.walk(staging):
    for f in files:
        if f.endswith(".png"):
            os.replace(os.path.join(folder, f), os.path.join(root, "images", f))
            names.add(f)
shutil.rmtree(staging)
print(len(names))
PY
}

process_archive() {  # name url sha256 images
    local name=$1 url=$2 sha=$3 expected=$4 got bad n start
    local archive="$state/$name"
    if [ -f "$state/$name.extracted" ]; then
        echo "$name: already downloaded, verified and extracted"
        return 0
    fi
    if [ ! -f "$state/$name.verified" ]; then
        if [ ! -f "$archive" ]; then
            [ -n "$mirror" ] && url="${mirror%/}/$name"
            start=$SECONDS
            if [ -s "$archive.part" ]; then
                echo "$name: continuing the download from $(du -h "$archive.part" | cut -f1)"
            else
                echo "$name: downloading"
            fi
            if ! download "$url" "$archive.part"; then
                echo "$prog: $name: download failed from $url; run again to continue" >&2
                return 1
            fi
            mv "$archive.part" "$archive"
            echo "$name: downloaded $(du -h "$archive" | cut -f1) in $((SECONDS - start)) s"
        fi
        got=$(sha256sum "$archive" | cut -d' ' -f1)
        if [ "$got" != "$sha" ]; then
            bad="$archive.bad-$(date +%Y%m%d-%H%M%S)"
            mv "$archive" "$bad"
            echo "$prog: $name: checksum mismatch (expected $sha, got $got): not extracted," \
                 "moved aside to $bad; run again to fetch it anew" >&2
            return 1
        fi
        touch "$state/$name.verified"
    fi
    n=$(extract "$archive" "$name") || return 1
    echo "$n" > "$state/$name.extracted"
    [ "$n" = "$expected" ] || echo "$prog: $name: $n images, the list says $expected" >&2
    if [ "$delete" = 1 ]; then rm -f "$archive" "$state/$name.verified"; fi
    echo "$name: extracted $n images ($(ls "$state"/*.extracted 2>/dev/null | wc -l) of $selected archives done)"
}

export -f process_archive download extract
export prog dir state mirror jobs delete selected

echo "$prog: $selected of $total_archives archives into $dir/images/ ($jobs at a time)"
failed=0
printf '%s\n' "$archives" | xargs -P "$jobs" -L 1 bash -c 'process_archive "$@"' _ || failed=1

# ---- the label table and boxes the repository ships, then the check ---------------------------
ship() {  # name: the repository's copy, unless DIR already has one
    gunzip -c "$here/nih/$1.gz" > "$dir/.$1.tmp" && mv "$dir/.$1.tmp" "$dir/$1"
}
ls "$dir"/Data_Entry_2017*.csv* >/dev/null 2>&1 || ship Data_Entry_2017_v2020.csv
ls "$dir"/BBox_List_2017.csv* >/dev/null 2>&1 || ship BBox_List_2017.csv

python3 - "$dir" "$first" "$selected" "$total_archives" <<'PY' || failed=1
import csv, gzip, os, sys
root, first, selected, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
table = next(os.path.join(root, n + gz) for n in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
             for gz in ("", ".gz") if os.path.exists(os.path.join(root, n + gz)))
with (gzip.open if table.endswith(".gz") else open)(table, "rt", newline="") as f:
    listed = [row[0] for row in csv.reader(f)][1:]
present = set(os.listdir(os.path.join(root, "images")))
missing = [n for n in listed if n not in present]
have = len(listed) - len(missing)
if not missing:
    print(f"batch_download.sh: all {len(listed):,} images of {os.path.basename(table)} are in {root}/images/")
elif first and selected < total:
    print(f"batch_download.sh: {have:,} of the {len(listed):,} images of {os.path.basename(table)} "
          f"are present (archives 1-{selected} of {total}); run again without --first for the rest")
else:
    sys.exit(f"batch_download.sh: {len(missing):,} of the {len(listed):,} images of "
             f"{os.path.basename(table)} are missing from {root}/images/, e.g. {', '.join(missing[:3])}")
PY

if [ "$failed" = 1 ]; then
    echo "$prog: some archives failed (see above); run the same command again to finish" >&2
    exit 1
fi
if [ "$dir" = data ]; then run="bash run.sh"; else run="DATA_DIR=$dir bash run.sh"; fi
echo "next: python stats.py --data-dir $dir   # per-disease statistics"
echo "      $run                              # train"
