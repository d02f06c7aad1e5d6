"""bench/peers: the TRL runner's sample conversion and batch counting, and the rounds' selection and summary."""

import json
import sys

import torch

from mgmlora.batch import IGNORE_INDEX
from tests.conftest import ROOT, load_script


def _peers(name):
    sys.path.insert(0, str(ROOT / "bench"))  # trl_sft imports train_step as its sibling script does
    try:
        return load_script(ROOT / "bench" / "peers" / f"{name}.py")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_samples_of_recovers_each_sample_and_its_supervised_positions():
    trl_sft = _peers("trl_sft")
    train_step = load_script(ROOT / "bench" / "train_step.py")
    samples = [([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]), ([9, 10], [IGNORE_INDEX, 10])]
    batch = train_step.pad(samples)  # right-padded to 4 positions
    rows = trl_sft.samples_of([batch])
    assert rows == [{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]},
                    {"input_ids": [9, 10], "completion_mask": [0, 1]}]


def test_counting_collator_records_packed_lengths_and_loss_positions_in_order():
    trl_sft = _peers("trl_sft")

    def packed(examples):  # what TRL's padding-free collator returns: one row, sequence boundaries
        lengths = [len(e) for e in examples]
        ends = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        labels = torch.cat([torch.tensor(e) for e in examples])[None]
        return {"cu_seq_lens_q": ends, "labels": labels}

    collator = trl_sft.CountingCollator(packed)
    collator([[1, 2, 3], [IGNORE_INDEX, 4]])
    collator([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7]])
    # labels[:, 1:] is what is scored: the first position of the row never is
    assert collator.batches == [([3, 2], 3), ([5], 3)]


def test_rounds_pick_the_fastest_setting_within_the_budget():
    rounds = _peers("rounds")
    record = {"variants": {"a": {"tokens_per_s": 100, "peak_alloc_gib": 70},
                           "b": {"tokens_per_s": 150, "peak_alloc_gib": 81},  # faster, over the budget
                           "c": {"samples_per_step": 8, "oom": "CUDA out of memory"},
                           "d": {"tokens_per_s": 120, "peak_alloc_gib": None}}}  # peak unmeasured
    assert rounds.best_within(record, 80, cuda=True)[0] == "a"
    assert rounds.best_within(record, 80, cuda=False)[0] == "d"  # CPU smoke runs measure no peak
    assert rounds.best_within(record, 60, cuda=True) is None


def test_rounds_summary_uses_complete_rounds_only():
    rounds = _peers("rounds")
    done = [{"ratio": 2.0, "ours_tokens_per_s": 20, "peer_tokens_per_s": 10, "ours_mfu": 0.3},
            {"ratio": 1.5, "ours_tokens_per_s": 15, "peer_tokens_per_s": 10, "ours_mfu": 0.2},
            {"ratio": 1.8, "ours_tokens_per_s": 18, "peer_tokens_per_s": 10, "ours_mfu": 0.25}]
    summary = rounds.summarise(done + [{"ours_tokens_per_s": 99, "peer_error": "exit 1"}])
    assert summary["rounds_complete"] == 3
    assert (summary["ratio_median"], summary["ratio_min"], summary["ratio_max"]) == (1.8, 1.5, 2.0)
    assert summary["ours_tokens_per_s_median"] == 18 and summary["ours_mfu"] == 0.25
    assert summary["peer_mfu"] is None  # no round measured it


def test_a_side_without_a_setting_says_why():
    rounds = _peers("rounds")
    assert rounds.why_none({"error": "exit 1"}, 80) == "exit 1"
    failed = {"variants": {"a": {"error": "CheckpointError: x"}, "b": {"error": "CheckpointError: y"}}}
    assert rounds.why_none(failed, 80) == "every setting failed: a: CheckpointError: x; b: CheckpointError: y"
    over = {"variants": {"a": {"tokens_per_s": 9, "peak_alloc_gib": 90}, "b": {"error": "OOM"}}}
    assert rounds.why_none(over, 80) == "no setting within 80 GiB (1 of 2 settings failed: OOM)"


def test_rounds_stop_after_round_one_when_a_side_has_no_setting(tmp_path, monkeypatch):
    rounds = _peers("rounds")
    side = tmp_path / "side.py"  # a stand-in for a benchmark: writes one variant, failed or measured
    side.write_text("import json, sys\n"
                    "out = sys.argv[sys.argv.index('--out') + 1]\n"
                    "rec = {'error': 'CheckpointError: x'} if sys.argv[1] == 'fail' else "
                    "{'tokens_per_s': 10.0, 'peak_alloc_gib': None, 'step_s_median': 1.0, 'samples_per_step': 4}\n"
                    "json.dump({'variants': {sys.argv[1]: rec}}, open(out, 'w'))\n")
    out = tmp_path / "rounds.json"
    monkeypatch.setattr(sys, "argv", ["rounds.py", "--model", "m", "--budget_gib", "80", "--targets", "attention",
                                      "--peer", "plain", "--ours", f"{side} {{sweep}}", "--ours_sweep", "fail",
                                      "--peer_cmd", f"{side} {{sweep}}", "--peer_sweep", "ok", "--rounds", "3",
                                      "--out", str(out)])
    rounds.main()
    result = json.loads(out.read_text())
    assert [(r["round"], r["side"]) for r in result["runs"]] == [(1, "ours"), (1, "peer")]  # no rounds 2 and 3
    assert result["stopped"] == "after round 1: ours: every setting failed: fail: CheckpointError: x"
    assert result["rounds"][0]["peer_tokens_per_s"] == 10.0 and result["rounds_complete"] == 0


def test_an_old_tree_peer_runs_with_its_own_pythonpath(tmp_path, monkeypatch):
    """--peer old: the peer's runs see --peer_pythonpath (the earlier tree's src), ours keep this process's."""
    rounds = _peers("rounds")
    side = tmp_path / "side.py"  # reports its PYTHONPATH's length as tokens/s, so the rounds show which one it saw
    side.write_text("import json, os, sys\n"
                    "out = sys.argv[sys.argv.index('--out') + 1]\n"
                    "rec = {'tokens_per_s': float(len(os.environ.get('PYTHONPATH', ''))), 'peak_alloc_gib': None,\n"
                    "       'step_s_median': 1.0, 'samples_per_step': 4}\n"
                    "json.dump({'variants': {sys.argv[1]: rec}}, open(out, 'w'))\n")
    monkeypatch.setenv("PYTHONPATH", "ab")
    out = tmp_path / "rounds.json"
    monkeypatch.setattr(sys, "argv", ["rounds.py", "--model", "m", "--budget_gib", "80", "--targets", "attention",
                                      "--peer", "old", "--peer_pythonpath", "abcd", "--ours", f"{side} {{sweep}}",
                                      "--ours_sweep", "x", "--peer_cmd", f"{side} {{sweep}}", "--peer_sweep", "x",
                                      "--rounds", "2", "--out", str(out)])
    rounds.main()
    result = json.loads(out.read_text())
    assert [(r["ours_tokens_per_s"], r["peer_tokens_per_s"]) for r in result["rounds"]] == [(2.0, 4.0)] * 2
    assert result["ratio_median"] == 0.5 and result["peer"] == "old" and result["peer_pythonpath"] == "abcd"


def test_the_loop_side_reports_a_fit_run_as_one_setting_rounds_can_read(tmp_path, monkeypatch):
    """bench/peers/loop.py: fit_smoke's record becomes rounds.py's `loop` setting; an OOM run or one without timed
    steps becomes an error that why_none reports, not a figure."""
    loop, rounds = _peers("loop"), _peers("rounds")
    fit = {"tokens_per_s_median": 18000.0, "peak_mem_alloc_gib": 56.4, "step_time_s_median": 2.0,
           "train_loss": [12.32, 12.31], "optimizer_steps": 6, "device": "cpu", "versions": {"torch": "x"}}
    stub = tmp_path / "fit_smoke.py"  # a stand-in for bench/fit_smoke.py: writes `fit` to its first argument
    stub.write_text(f"import json, sys\njson.dump({{**{fit!r}, 'argv': sys.argv[2:]}}, open(sys.argv[1], 'w'))\n"
                    "sys.exit(3 if '--fail' in sys.argv else 0)\n")
    monkeypatch.setattr(loop, "FIT_SMOKE", stub)
    out = tmp_path / "ours.json"
    monkeypatch.setattr(sys, "argv", ["loop.py", "fit", "--config", "c.yaml", "--out", str(out)])
    assert loop.main() == 0
    record = json.loads(out.read_text())
    assert record["variants"]["loop"] == {"tokens_per_s": 18000.0, "peak_alloc_gib": 56.4, "step_s_median": 2.0,
                                          "loss_first_step": 12.32, "mfu": None, "hfu": None,
                                          "positions_per_micro_batch": None}
    assert record["fit"] == {**fit, "argv": ["fit", "--config", "c.yaml"]}  # --out is the side's, not the fit's
    assert rounds.best_within(record, 80, cuda=True)[0] == "loop"
    assert rounds.best_within(record, 50, cuda=True) is None  # 56.4 GiB is over a 50 GiB budget
    monkeypatch.setattr(sys, "argv", ["loop.py", "fit", "--fail", "--out", str(out)])
    assert loop.main() == 3  # the fit's exit status passes through
    oom = loop.as_setting({**fit, "oom": True})
    assert oom == {"error": "out of memory at 56.4 GiB allocated"}
    assert rounds.why_none({"variants": {"loop": oom}}, 80) == "every setting failed: loop: " + oom["error"]
    assert "error" in loop.as_setting({**fit, "tokens_per_s_median": 0})
    assert "error" in loop.as_setting({**fit, "optimizer_steps": 2})  # only warm-up steps: nothing timed


def _side_starting_a_child(tmp_path):
    """A stand-in side that starts a child which would outlive it, writes the child's pid, then waits a minute."""
    pid_file, side = tmp_path / "child.pid", tmp_path / "side.py"
    side.write_text("import subprocess, sys, time\n"
                    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
                    "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                    f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
                    "time.sleep(60)\n")
    return side, pid_file


def _assert_ended(pid_file):
    """The child named in pid_file is gone within 5 s (SIGKILL is asynchronous); killed here if not."""
    import os
    import signal
    import time

    child = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError(f"the side's child {child} outlived the side")


def test_a_timed_out_side_is_killed_with_the_processes_it_started(tmp_path):
    """rounds.py's timeout ends the side's whole process group: a child it started (loop.py's fit) does not keep
    running into the other side's run."""
    side, pid_file = _side_starting_a_child(tmp_path)
    record = _peers("rounds").run_side(str(side), "x", tmp_path / "out.json", timeout=3)
    assert record["error"] == "timed out after 3 s"
    _assert_ended(pid_file)


def _rounds_file(ours, peer, setting="trlx80", model="qwen3-30b-a3b"):
    rounds = [{"round": i + 1, "ours_setting": "loop", "peer_setting": setting, "ours_tokens_per_s": o,
               "peer_tokens_per_s": p, **({"ratio": o / p} if p else {"peer_error": "timed out"})}
              for i, (o, p) in enumerate(zip(ours, peer))]
    return {"command": f"rounds --ours 'loop.py fit' --peer_cmd 'trl_sft.py' --rounds {len(ours)}", "model": model,
            "budget_gib": 80.0, "targets": "attention", "peer": "trl",
            "device": "H100", "rounds": rounds, "runs": [{"round": r["round"], "side": "ours"} for r in rounds]}


def test_merged_rounds_keep_complete_rounds_in_order_and_summarise_them_all():
    merge = _peers("merge_rounds").merge
    merged = merge({"a.json": _rounds_file([20, 21, 22], [10, 10, None]), "c.json": _rounds_file([18, 30], [10, 10])})
    assert [(r["round"], r["source"], r["source_round"]) for r in merged["rounds"]] == [
        (1, "a.json", 1), (2, "a.json", 2), (3, "c.json", 1), (4, "c.json", 2)]  # a.json's third had no peer run
    # ratios 2.0, 2.1, 1.8, 3.0: median of four is the mean of the middle two
    assert merged["rounds_complete"] == 4 and abs(merged["ratio_median"] - 2.05) < 1e-12
    assert (merged["ratio_min"], merged["ratio_max"]) == (1.8, 3.0)
    assert list(merged["sources"]) == ["a.json", "c.json"] and merged["model"] == "qwen3-30b-a3b"
    assert [(r["round"], r["source_round"]) for r in merged["runs"]] == [(1, 1), (2, 2), (None, 3), (3, 1), (4, 2)]


def test_rounds_of_different_comparisons_are_not_merged():
    import pytest

    merge = _peers("merge_rounds").merge
    with pytest.raises(ValueError, match="different settings: \\['trlx64', 'trlx80'\\]"):
        merge({"a.json": _rounds_file([20], [10]), "b.json": _rounds_file([20], [9], setting="trlx64")})
    with pytest.raises(ValueError, match="b.json: model is 'mgm-2b'"):
        merge({"a.json": _rounds_file([20], [10]), "b.json": _rounds_file([20], [10], model="mgm-2b")})
    other = _rounds_file([20], [10])
    other["command"] = other["command"].replace("loop.py fit", "loop.py fit --model.lora.lora_dropout 0.0")
    with pytest.raises(ValueError, match="b.json: --ours differs"):
        merge({"a.json": _rounds_file([20], [10]), "b.json": other})
    with pytest.raises(ValueError, match="no complete round"):
        merge({"a.json": _rounds_file([20], [None])})


def test_stopping_the_rounds_stops_the_running_side_and_what_it_started(tmp_path):
    """A SIGTERM to rounds.py (the suite's `timeout`) ends the side it is running, children included."""
    import signal
    import subprocess
    import time

    side, pid_file = _side_starting_a_child(tmp_path)
    rounds = subprocess.Popen([sys.executable, str(ROOT / "bench" / "peers" / "rounds.py"), "--model", "m",
                               "--budget_gib", "80", "--targets", "attention", "--peer", "plain", "--ours",
                               f"{side} {{sweep}}", "--ours_sweep", "x", "--peer_cmd", f"{side} {{sweep}}",
                               "--peer_sweep", "x", "--out", str(tmp_path / "r.json")])
    for _ in range(100):  # until the side has started its child
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    rounds.send_signal(signal.SIGTERM)
    assert rounds.wait(timeout=20) == 128 + signal.SIGTERM
    _assert_ended(pid_file)


def test_a_failed_side_keeps_what_it_recorded(tmp_path):
    """A side that wrote its record and then exited non-zero (a fit that crashed after its steps) is an error that
    carries the record, not only the stderr tail."""
    side = tmp_path / "side.py"
    side.write_text("import json, sys\n"
                    "json.dump({'fit': {'optimizer_steps': 2}}, open(sys.argv[sys.argv.index('--out') + 1], 'w'))\n"
                    "sys.exit('crashed after step 2')\n")
    record = _peers("rounds").run_side(str(side), "x", tmp_path / "out.json", timeout=30)
    assert record["error"] == "exit 1" and record["record"] == {"fit": {"optimizer_steps": 2}}
    assert "crashed after step 2" in record["stderr_tail"]
