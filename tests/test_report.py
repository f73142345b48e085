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
