"""`upctl prepare` through the real Typer app: summary table, --json, one-line errors and exit codes."""

from __future__ import annotations

import json

from fixtures import layouts
from typer.testing import CliRunner

from upctl.main import app

runner = CliRunner()


def test_prepare_coco_table_and_json(tmp_path):
    raw, data, out = tmp_path / "coco", tmp_path / "data", tmp_path / "summary.json"
    expected = layouts.make_coco(raw)
    r = runner.invoke(app, ["prepare", "coco", "--root", str(raw), "--data-dir", str(data), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "train" in r.stdout and "missing_media: 1" in r.stdout and "bad_format_media: 1" in r.stdout
    assert "media missing: 1" in r.stdout and "unreadable: 1" in r.stdout
    summary = json.loads(out.read_text())
    assert summary["splits"] == expected["splits"] and summary["skipped"] == expected["skipped"]
    assert summary["dataset"] == "coco" and summary["out_dir"] == str(data / "coco") and summary["seconds"] >= 0
    assert (data / "coco" / "meta.json").is_file()


def test_prepare_video_with_options(tmp_path):
    raw, data = tmp_path / "msvd", tmp_path / "data"
    expected = layouts.make_msvd(raw)
    r = runner.invoke(
        app,
        [
            "prepare",
            "msvd",
            "--root",
            str(raw),
            "--data-dir",
            str(data),
            "-o",
            "split_sizes=4,2,2",
            "--option",
            "check=verify",
        ],
    )
    assert r.exit_code == 0, r.output
    meta = json.loads((data / "msvd" / "meta.json").read_text())
    assert meta["splits"] == expected["splits"] and meta["options"] == {"check": "verify", "split_sizes": "4,2,2"}


def test_prepare_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("UPCTL_DEBUG", raising=False)
    r = runner.invoke(app, ["prepare", "cocoo", "--data-dir", str(tmp_path)])
    assert r.exit_code == 1
    assert "unknown dataset 'cocoo' (did you mean coco?); known datasets:" in r.stderr
    assert "glue-sst2" in r.stderr and "vqav2" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output

    r = runner.invoke(app, ["prepare", "coco", "--root", str(tmp_path / "absent"), "--data-dir", str(tmp_path)])
    assert r.exit_code == 1
    line = r.stderr.strip()
    assert str(tmp_path / "absent") in line and "dataset_coco.json" in line and "Traceback" not in r.output

    (tmp_path / "coco").mkdir()
    r = runner.invoke(app, ["prepare", "coco", "--root", str(tmp_path / "coco"), "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 1 and "dataset_coco.json" in r.stderr and "Karpathy" in r.stderr

    r = runner.invoke(app, ["prepare", "coco", "--root", str(tmp_path / "coco"), "-o", "novalue"])
    assert r.exit_code == 1 and "--option 'novalue': expected key=value" in r.stderr


def test_prepare_help_has_examples():
    r = runner.invoke(app, ["prepare", "--help"])
    assert r.exit_code == 0
    assert "upctl prepare coco --root /data/coco" in r.stdout and "kinetics400" in r.stdout
