"""A stray RANK/LOCAL_RANK in the environment does not silence logging (strategies.align_rank_zero)."""


def test_a_stray_rank_in_the_environment_does_not_silence_a_single_process_run(monkeypatch, in_repo_root):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from mgmlora.cli import main

    monkeypatch.setattr(rank_zero_only, "rank", 3)  # what Lightning read from RANK=3 at import
    cli = main(["--config", "configs/demo_chat.yaml"], run=False)
    assert cli.trainer.world_size == 1 and cli.trainer.global_rank == 0
    assert rank_zero_only.rank == 0  # info lines, the final summary among them, are printed again
