"""The DICOM node's package, node/, without running it: the check of pynetdicom's version (the
node reaches into its internals, node/pynetdicom_internals.py), the settings serve.py builds
from its flags, and the package's layering (no script imported, no cycle: test_class_sets)."""
import ast
from dataclasses import fields

import pytest

from conftest import REPO

SCRIPTS = {"serve", "retrieve", "main", "infer", "report"}


def test_the_pynetdicom_check_accepts_the_versions_checked_and_refuses_another():
    import pynetdicom

    from node.dicom import ServeError
    from node.pynetdicom_internals import PYNETDICOM_VERSIONS, check_pynetdicom_version
    assert pynetdicom.__version__ in PYNETDICOM_VERSIONS  # the installed one was checked
    check_pynetdicom_version()
    for version in PYNETDICOM_VERSIONS:
        check_pynetdicom_version(version)
    for other in ("3.1.0", "2.1.1", "3.0.4.post1", ""):
        with pytest.raises(ServeError) as e:
            check_pynetdicom_version(other)
        message = str(e.value)
        assert "\n" not in message and f"pynetdicom {other} is installed" in message
        assert message.endswith(f"pip install pynetdicom=={PYNETDICOM_VERSIONS[-1]}")


def test_serve_refuses_to_start_with_another_pynetdicom(tmp_path, monkeypatch, capsys):
    """serve.py's start: one line, exit status 1, before the spool is made or the model read."""
    import pynetdicom

    import serve
    monkeypatch.setattr(pynetdicom, "__version__", "9.9.9")
    spool = tmp_path / "spool"
    with pytest.raises(SystemExit) as e:
        serve.main(["--spool", str(spool), "--allow-any-ae", "--destination",
                    "PACS@127.0.0.1:104", "--model-dir", str(tmp_path / "none")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: pynetdicom 9.9.9 is installed"), err
    assert not spool.exists()


def test_the_node_settings_are_serve_s_flags():
    """NodeSettings holds each of serve.py's flags by its name (--allow-any-ae as allow_ae
    None), as values: frozen, with no argparse namespace in it."""
    import dataclasses

    import serve
    from node.settings import Destination, NodeSettings
    args = serve.get_args(["--spool", "s", "--allow-ae", "A", "B", "--destination",
                           "PACS@10.0.0.5:104"])
    assert {f.name for f in fields(NodeSettings)} == set(vars(args)) - {"allow_any_ae"}
    settings = serve.node_settings(args)
    assert settings.allow_ae == ("A", "B")
    assert settings.destination == Destination("PACS", "10.0.0.5", 104)
    assert str(settings.destination) == "PACS@10.0.0.5:104"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1
    anyone = serve.node_settings(serve.get_args(["--spool", "s", "--allow-any-ae",
                                                 "--destination", "PACS@10.0.0.5:104"]))
    assert anyone.allow_ae is None


def test_node_imports_no_script_and_takes_no_flags():
    """node/ imports the flat library modules, never a script; it reads no argparse namespace."""
    for path in sorted((REPO / "node").glob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = {node.module.split(".")[0]}
            else:
                continue
            assert not names & SCRIPTS, f"node/{path.name} imports {names & SCRIPTS}"
        assert "argparse" not in source and "args." not in source, path.name
