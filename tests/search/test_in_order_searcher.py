"""The searcher between Tune and Optuna, driven as Tune drives it, on a real Optuna study in SQLite: proposals
wait for the trials they depend on, outcomes are told in trial order and truthfully (a stopped trial is PRUNED,
a failed one FAIL), and a restored searcher goes on where its snapshot was."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from ptune_search.search.sampler import TUNE_TRIAL_ID_ATTR, InOrderPrunedOptunaSearcher, SearchSpaceSampler


def searcher(tmp_path: Path, concurrency: int = 2, num_samples: int = 6) -> InOrderPrunedOptunaSearcher:
    space = SearchSpaceSampler(["ptune", "deep_ptune"], (2, 8), (1e-3, 1e-1), ("labels",))
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2, multivariate=True, constant_liar=True)
    return InOrderPrunedOptunaSearcher(
        space, sampler, storage, "search", "val_accuracy", "max", concurrency=concurrency, num_samples=num_samples
    )


def states(search: InOrderPrunedOptunaSearcher) -> dict[str, str]:
    return {trial.user_attrs[TUNE_TRIAL_ID_ATTR]: trial.state.name for trial in search.study.get_trials()}


def test_a_proposal_waits_for_the_trial_it_depends_on_and_outcomes_are_told_in_order(tmp_path: Path) -> None:
    search = searcher(tmp_path)
    first, second = search.suggest("t0"), search.suggest("t1")
    assert set(first) == {"tuning_mode", "pre_seq_len", "lr", "prompt_init", "head"}
    assert (first["prompt_init"], first["head"]) == ("labels", "linear")
    assert second is not None
    search.on_trial_result("t1", {"step": 5, "val_accuracy": 0.4})
    search.on_trial_complete("t1", {"step": 10, "val_accuracy": 0.5, "finished": True})
    assert search.suggest("t2") is None  # trial 2 is proposed from trial 0's outcome, which has not ended
    assert states(search) == {"t0": "RUNNING", "t1": "RUNNING"}  # t1 is held back until t0 is told
    search.on_trial_result("t0", {"step": 5, "val_accuracy": 0.3})
    search.on_trial_complete("t0", {"step": 5, "val_accuracy": 0.3})  # ASHA stopped it: no "finished"
    assert search.suggest("t2") is not None
    assert states(search) == {"t0": "PRUNED", "t1": "RUNNING", "t2": "RUNNING"}
    assert search.suggest("t3") is not None  # t1 had ended: told now, in order
    told = states(search)
    assert (told["t1"], told["t3"]) == ("COMPLETE", "RUNNING")
    frozen = {t.user_attrs[TUNE_TRIAL_ID_ATTR]: t for t in search.study.get_trials()}
    assert frozen["t0"].intermediate_values == {5: 0.3} and frozen["t1"].intermediate_values == {5: 0.4, 10: 0.5}
    assert frozen["t1"].value == 0.5


def test_asked_again_a_trial_gets_the_same_config(tmp_path: Path) -> None:
    search = searcher(tmp_path)
    assert search.suggest("t0") == search.suggest("t0")


def test_a_failed_trial_is_told_fail_and_the_end_tells_every_ended_trial(tmp_path: Path) -> None:
    search = searcher(tmp_path, num_samples=2)
    search.suggest("t0"), search.suggest("t1")
    search.on_trial_complete("t1", error=True)
    assert states(search)["t1"] == "RUNNING"  # held back behind t0
    search.on_trial_complete("t0", {"step": 10, "val_accuracy": 0.6, "finished": True})
    assert states(search) == {"t0": "COMPLETE", "t1": "FAIL"}


def test_tell_ended_tells_what_ended_out_of_order_when_the_search_stops(tmp_path: Path) -> None:
    search = searcher(tmp_path)
    search.suggest("t0"), search.suggest("t1")
    search.on_trial_complete("t1", {"step": 10, "val_accuracy": 0.5, "finished": True})
    search.tell_ended()
    assert states(search) == {"t0": "RUNNING", "t1": "COMPLETE"}


def test_a_restored_searcher_goes_on_and_fails_a_trial_asked_after_its_snapshot(tmp_path: Path) -> None:
    search = searcher(tmp_path)
    search.suggest("t0"), search.suggest("t1")
    search.save(str(tmp_path / "searcher.pkl"))
    search.on_trial_complete("t0", {"step": 10, "val_accuracy": 0.6, "finished": True})
    assert search.suggest("t2") is not None  # asked of Optuna, but the driver dies before Tune's next snapshot
    restored = searcher(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    ghost = [t for t in restored.study.get_trials() if t.user_attrs[TUNE_TRIAL_ID_ATTR] == "t2"]
    assert ghost[0].state == TrialState.FAIL
    assert restored.order == ["t0", "t1"] and restored.told == 0
    restored.on_trial_complete("t0", {"step": 10, "val_accuracy": 0.6, "finished": True})
    assert restored.suggest("t3") is not None
    assert states(restored)["t0"] == "COMPLETE"
