"""`flexgen-lite report`: a PNG from a trace made here (skipped without the [report] extra)."""

from __future__ import annotations

import pytest

from flexgen_lite.cli.main import main

pytest.importorskip("matplotlib")


def test_report_writes_a_png_from_a_trace(tiny_models, tmp_path, capsys):
    trace, png = tmp_path / "trace.json", tmp_path / "report.png"
    main(["bench", "--model", str(tiny_models["opt"][0]), "--prompt-len", "8", "--gen-len", "4",
          "--percent", "0", "0", "100", "0", "100", "0", "--gpu-batch-size", "2", "--num-gpu-batches", "2",
          "--dtype", "float32", "--offload-dir", str(tmp_path), "--trace", str(trace)])
    capsys.readouterr()
    main(["report", str(trace), "-o", str(png)])
    assert f"wrote {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 300_000


def test_report_refuses_a_file_that_is_not_a_trace(tmp_path, capsys):
    bad = tmp_path / "not-a-trace.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(SystemExit) as e:
        main(["report", str(bad), "-o", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "is not a trace written by --trace" in capsys.readouterr().err


def test_report_names_what_it_writes_and_refuses_a_trace_without_its_context(tiny_models, tmp_path, capsys):
    """helper-41: `-o noext` said 'wrote noext' of matplotlib's noext.png; a trace without its run context drew a
    blank chart and exited 0, and a context of another shape ended in a traceback."""
    import json

    trace = tmp_path / "trace.json"
    main(["bench", "--model", str(tiny_models["opt"][0]), "--prompt-len", "8", "--gen-len", "2",
          "--percent", "100", "0", "100", "0", "100", "0", "--dtype", "float32", "--trace", str(trace)])
    capsys.readouterr()
    main(["report", str(trace), "-o", str(tmp_path / "noext")])
    assert f"wrote {tmp_path / 'noext.png'}" in capsys.readouterr().out and (tmp_path / "noext.png").is_file()
    data = json.loads(trace.read_text())
    for name, other in (("none", None), ("shape", {**data["otherData"], "rates": 3})):
        edited = tmp_path / f"{name}.json"
        edited.write_text(json.dumps({k: v for k, v in data.items() if k != "otherData"}
                                     | ({"otherData": other} if other else {})))
        with pytest.raises(SystemExit) as e:
            main(["report", str(edited), "-o", str(tmp_path / f"{name}.png")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and str(edited) in err, err
