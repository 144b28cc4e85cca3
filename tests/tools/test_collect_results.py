"""tools/collect_results.py: the result table of a set of runs (values, deltas to a baseline,
the paper's numbers), the choice of the baseline, and the parsers of log.txt / metrics.json."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import config_yaml, copypaste_log, load_tool


@pytest.fixture
def fake_runs(tmp_path):
    # 1) log.txt with an old and a newer evaluation, config.yaml naming the config
    a = tmp_path / "retinanet_R_50_FPN_1x"
    a.mkdir()
    a.joinpath("config.yaml").write_text(
        config_yaml("./output/COCO-Detection/retinanet_R_50_FPN_1x")
    )
    a.joinpath("log.txt").write_text(
        copypaste_log(
            [
                ("coco_2017_val", [1, 2, 3, 4, 5, 6]),
                ("coco_2017_val", [35.5123, 55.01, 38.3, 20.04, 39.6, 46.8]),
            ]
        )
    )
    # 2) metrics.json only; the folder name says nothing, config.yaml's OUTPUT_DIR does
    b = tmp_path / "job_42"
    b.mkdir()
    b.joinpath("config.yaml").write_text(config_yaml("/ckpt/retinanet_R_50_FPN_1x_eapm_mu1.5"))
    b.joinpath("metrics.json").write_text(
        json.dumps({"iteration": 19, "loss_cls": 1.0, "eapm/cls_mf_pos": 1.2}) + "\n"
        + json.dumps({"iteration": 89999, "bbox/AP": 36.9, "bbox/AP50": 56.6, "bbox/AP75": 39.7,
                      "bbox/APs": 20.5, "bbox/APm": 40.6, "bbox/APl": 49.1,
                      "bbox/AP-person": 50.0}) + "\n"
    )  # fmt: skip
    # 3) no config.yaml: named by the folder; evaluated on test-dev (paper Table 3)
    c = tmp_path / "libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0"
    c.mkdir()
    c.joinpath("log.txt").write_text(
        copypaste_log([("coco_2017_test-dev", [38.0, 58.0, 41.0, 21.0, 41.0, 48.0])])
    )
    # 4) nothing yet
    d = tmp_path / "fcos_R_50_FPN_1x"
    d.mkdir()
    return [str(a), str(b), str(c), str(d)]


def _rows(table):
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| run "):
            cells = [x.strip() for x in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_collect_results_table_values_deltas_and_paper(fake_runs, tmp_path, capsys):
    tool = load_tool("collect_results")
    out = tmp_path / "table.md"
    table = tool.main([*fake_runs, "--paper", "--output", str(out)])
    assert capsys.readouterr().out == table == out.read_text()
    assert table.splitlines()[0].startswith(
        "| run | dataset | AP | AP (paper) | AP50 | AP50 (paper) |"
    )
    rows = _rows(table)
    base = rows["retinanet_R_50_FPN_1x (baseline)"]
    # the *last* evaluation of the log, the paper's Table 1 RetinaNet row
    assert base == ["coco_2017_val", "35.5", "35.6", "55.0", "55.5", "38.3", "38.3", "20.0", "20.0",
                    "39.6", "39.6", "46.8", "46.8"]  # fmt: skip
    mu = rows["retinanet_R_50_FPN_1x_eapm_mu1.5"]
    assert mu[:5] == ["coco_2017_val", "36.9 (+1.4)", "37.1 (+1.5)", "56.6 (+1.6)", "56.6 (+1.1)"]
    assert mu[-2:] == ["49.1 (+2.3)", "49.1 (+2.3)"]
    # test-dev: paper Table 3, no differences across evaluation sets
    td = rows["libra_retinanet_R_50_FPN_1x_eapm_mu1.5_theta1.0"]
    assert td[:3] == ["coco_2017_test-dev", "38.0", "38.5"]
    assert "Table 3" in table and 'Table 1, "RetinaNet, mu = 1.5"' in table
    # no results yet: dashes, a note, but the paper numbers
    assert rows["fcos_R_50_FPN_1x"][1:3] == ["—", "35.7 (+0.1)"]
    assert "fcos_R_50_FPN_1x: no bbox results found" in table


def test_collect_results_baseline_choice_and_no_paper(fake_runs):
    tool = load_tool("collect_results")
    by_name = _rows(
        tool.main(
            [*fake_runs[:2], "--baseline", "retinanet_R_50_FPN_1x_eapm_mu1.5", "--decimals", "2"]
        )
    )
    assert by_name["retinanet_R_50_FPN_1x"][1] == "35.51 (-1.39)"
    assert by_name["retinanet_R_50_FPN_1x_eapm_mu1.5 (baseline)"][1] == "36.90"
    assert len(by_name["retinanet_R_50_FPN_1x"]) == 7  # no paper columns
    assert _rows(tool.main([*fake_runs[:2], "--baseline", "1", "--decimals", "2"])) == by_name
    none = _rows(tool.main([*fake_runs[:2], "--baseline", "none"]))
    assert none["retinanet_R_50_FPN_1x_eapm_mu1.5"][1] == "36.9"
    with pytest.raises(SystemExit, match="matches no run"):
        tool.main([*fake_runs[:2], "--baseline", "nope"])


def test_collect_results_parsers(tmp_path):
    tool = load_tool("collect_results")
    blocks = tool.parse_log(
        copypaste_log([("a", [1, 2, 3, 4, 5, 6])])
        + "copypaste: Task: segm\n"
        + copypaste_log([("b", [7] * 6)])
    )
    assert [(d, t, v["AP"]) for d, t, v in blocks] == [("a", "bbox", 1.0), ("b", "bbox", 7.0)]
    nan = tool.parse_log(copypaste_log([("a", [math.nan] * 6)]))
    assert math.isnan(nan[0][2]["AP"])
    # several test sets: metrics.json keys carry the dataset
    (tmp_path / "metrics.json").write_text(
        json.dumps({"coco_2017_val/bbox/AP": 30.0, "other/bbox/AP": 20.0}) + "\n"
    )
    r = tool.read_results(str(tmp_path), dataset="coco_2017_val")
    assert r.ok and r.metrics == {"AP": 30.0} and r.source == "metrics.json"
