"""The tiny sweep end to end (bench/sweep.py on configs/sweep/demo.yaml) and the comparison it writes."""


import pytest

from mgmlora.tools.report import COLUMNS
from tests.conftest import ROOT, load_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_tiny_sweep_writes_the_comparison_table_and_valid_plots(tmp_path, in_repo_root, capsys):
    sweep = load_script(ROOT / "bench" / "sweep.py", "sweep")
    # --gpus: two variants at a time, each with its own CUDA_VISIBLE_DEVICES (ignored on this CPU machine) and log
    md = sweep.main(["--sweep", "configs/sweep/demo.yaml", "--steps", "4", "--output", str(tmp_path), "--gpus", "0,1",
                     "--",
                     "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2",
                     "--trainer.limit_val_batches", "2"])
    assert f"sweep report: {md}" in capsys.readouterr().out  # the sweep says where its report is
    lines = md.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| run"))
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| run")]
    assert [r.split("|")[1].strip() for r in rows] == ["r8_conservative", "r16_balanced", "r32_aggressive", "full"]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows}
    rank = COLUMNS.index("rank")
    assert [cells[n][rank] for n in ("r8_conservative", "r16_balanced", "r32_aggressive")] == ["8", "16", "32"]
    params = COLUMNS.index("trainable params")
    counts = [int(cells[n][params].replace(",", "")) for n in ("r8_conservative", "r16_balanced", "r32_aggressive",
                                                               "full")]
    assert counts == sorted(counts)  # more rank / more targets / full fine-tune train more parameters
    for name in ("final train loss", "best val loss", "tokens/s"):
        assert all(cells[n][COLUMNS.index(name)] != "-" for n in cells), name
    logs = sorted(p.name for p in (tmp_path / "runs").glob("*.log"))
    assert logs == sorted(f"{n}.log" for n in cells)
    assert all((tmp_path / "runs" / n).stat().st_size > 0 for n in logs)
    pngs = sorted(tmp_path.glob("*.png"))
    # CPU runs log no peak GPU memory: that chart is left out, and the report says so instead of showing zeros
    assert [p.name for p in pngs] == ["train_loss_vs_step.png", "train_loss_vs_tokens.png", "val_loss.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 1000 for p in pngs)
    assert any("`peak_memory.png` left out" in line for line in lines)
    assert not any("peak_memory.png)" in line for line in lines)

    # tokens/s is the whole run's: every step's tokens over every step's time (each step logged here), not one step's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in cells:
        events = EventAccumulator(str(tmp_path / "runs" / name / "version_0"))
        events.Reload()
        rates, times = events.Scalars("perf/tokens_per_s"), events.Scalars("perf/step_time_s")
        assert len(rates) == len(times) == 4
        whole = sum(r.value * t.value for r, t in zip(rates, times)) / sum(t.value for t in times)
        shown = float(cells[name][COLUMNS.index("tokens/s")].replace(",", ""))
        assert abs(shown - whole) <= 0.5 + 1e-6 * whole, (name, shown, whole)


def test_the_final_train_loss_is_the_mean_of_the_last_ten_logged_values():
    from mgmlora.tools.report import final_train_loss

    losses = [float(v) for v in range(1, 16)]  # 1 .. 15
    assert final_train_loss(losses) == 10.5  # (6 + ... + 15) / 10, by hand
    assert final_train_loss([4.0, 2.0]) == 3.0 and final_train_loss([]) is None


def test_compare_rejects_a_directory_without_logs(tmp_path):
    from mgmlora.commands import compare as compare_cli

    with pytest.raises(FileNotFoundError, match="no TensorBoard scalars"):
        compare_cli.main([str(tmp_path), "--output", str(tmp_path / "out")])


def test_a_missing_run_directory_is_one_line_and_writes_nothing(tmp_path):
    from mgmlora.errors import classify
    from mgmlora.tools.report import compare

    with pytest.raises(FileNotFoundError, match=r"run directory '.*missing' does not exist") as refused:
        compare([tmp_path / "missing"], tmp_path / "out")
    assert classify(refused.value) == ("user", 1) and "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_versions_of_one_experiment_are_told_apart_and_wall_time_leaves_out_the_gap_between_fits(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from mgmlora.tools.report import compare

    runs = [tmp_path / "ablation" / "version_0", tmp_path / "ablation" / "version_1", tmp_path / "other" / "version_0"]
    for run in runs:  # one fit of 10 s each
        with SummaryWriter(str(run)) as writer:
            for step, t in enumerate((1000.0, 1010.0)):
                writer.add_scalar("train/loss", 5.0 - step, step, walltime=t)
    with SummaryWriter(str(runs[1])) as writer:  # version_1 resumed into its own directory an hour later: 20 s more
        for step, t in ((2, 4610.0), (3, 4630.0)):
            writer.add_scalar("train/loss", 5.0 - step, step, walltime=t)
    rows = [line.split("|") for line in compare(runs, tmp_path / "out").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| run")]
    wall = COLUMNS.index("wall time s") + 1
    assert [(r[1].strip(), float(r[wall])) for r in rows] == [("ablation/version_0", 10.0),
                                                              ("ablation/version_1", 30.0), ("other/version_0", 10.0)]
    from mgmlora.tools.report import _distinct_names

    one = [tmp_path / "a" / "exp" / "version_0", tmp_path / "b" / "exp" / "version_0", tmp_path / "c" / "x" / "v"]
    assert _distinct_names(one) == ["a/exp/version_0", "b/exp/version_0", "c/x/v"]
    assert _distinct_names(one[2:]) == ["x"]
