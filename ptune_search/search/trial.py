"""One search trial: a Ray Tune actor that trains prompts and a head through the swarm.

A Tune iteration is ``eval_every`` optimizer steps followed by an evaluation on the validation split (a
fixed subset of it at the rungs before the last, the whole split at the end). A trial reports and exports its
best checkpoint on the whole validation split, not its last: ``val_accuracy``/``val_loss``/``best_step`` are the
best evaluation's, ``eval_accuracy``/``eval_loss`` the latest one's. Checkpoints hold the best prompts and head
(the files export reads), the current ones, the optimizer state and the step counter, so a retried trial
continues where it stopped, on the same data order; its prompt init is part of its config, so it keeps it.

A trial's head starts where a head-only sweep ended (``start_head``, fitted on the same inputs: linear probing
before fine-tuning, LP-FT) or, for ``head: label_words``, at the LM head's rows of the classes' label words;
it then trains with the prompts at its own, smaller learning rate (``head_lr``).

Tune reuses a trial's actor for the next trial (``reset_config``): the process, its swarm connection,
tokenizer and frozen weights stay, and the trial starts from the same seed as on a fresh actor, so its
losses are the same (``tests/search/test_trial_reuse.py``).

A trial without a tuning mode is the head-only baseline: it trains one head per candidate learning rate
(``baseline_lrs``) on the same features and reports the best on validation (see ``head_sweep``).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
from ray import tune
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from ptune_search.data import TaskData
from ptune_search.models.distributed import DistributedForSequenceClassification
from ptune_search.models.label_words import apply_label_word_head
from ptune_search.models.prompt_folder import HEAD_FILE, PROMPT_FILE, PTUNE_CONFIG_FILE
from ptune_search.models.prompt_init import apply_prompt_init, initial_prompt_tokens
from ptune_search.models.ptune import PTuneConfig
from ptune_search.models.registry import AutoDistributedModelForSequenceClassification
from ptune_search.search.head_sweep import HeadSweep
from ptune_search.swarm.client.client_config import ClientConfig
from ptune_search.training.steps import Evaluation, evaluate, train_step, trainable_parameters

OPTIMIZER_FILE = "optimizer.pt"
CURRENT_FILE = "trial_current.safetensors"  # the trained tensors as they are now (the export files hold the best)
STATE_FILE = "trial_state.json"
SWEEP_FILE = "baseline_heads.safetensors"


@dataclasses.dataclass(frozen=True)
class TrialSettings:
    """What every trial of one search shares; the searched values come in the Tune config."""

    model_path: str
    task: TaskData  # loaded, checked and tokenized once, by the driver
    max_steps: int
    eval_every: int
    batch_size: int
    seed: int
    eval_batch_size: int  # the config's budget.eval_batch_size
    rung_validation_size: Optional[int] = None  # None: every evaluation uses the whole validation split
    swarm: Optional[ClientConfig] = None  # how trials reach the swarm; None: blocks in the trial's own process
    bare_task: Optional[TaskData] = None  # the task without its template, for the baseline (None: ``task``)
    start_head: Optional[torch.Tensor] = None  # the head sweep's best ``score.weight`` (None: a random head)
    head_lr: Optional[float] = None  # the head's learning rate in prompt trials (None: the trial's lr)
    label_word_tokens: Optional[tuple[int, ...]] = None  # per class, for trials with ``head: label_words``

    def task_of(self, config: dict[str, Any]) -> TaskData:
        """The task a trial of ``config`` reads: the bare text for a baseline (``bare_text``), else ``task``."""
        return self.bare_task if config.get("bare_text") and self.bare_task is not None else self.task


def build_classifier(
    model_path: str, num_labels: int, pad_token_id: int, ptune: PTuneConfig, swarm: Optional[ClientConfig]
) -> DistributedForSequenceClassification:
    """The classifier of the checkpoint's family, its blocks on the swarm (or local when ``swarm`` is None)."""
    settings = dict(num_labels=num_labels, pad_token_id=pad_token_id, **dataclasses.asdict(ptune))
    if swarm is None:
        return AutoDistributedModelForSequenceClassification.from_pretrained(model_path, local_blocks=True, **settings)
    return AutoDistributedModelForSequenceClassification.from_pretrained(
        model_path, **settings, **dataclasses.asdict(swarm)
    )


def ptune_config_of(searched: dict[str, Any]) -> PTuneConfig:
    """The searched values as a PTuneConfig; a head-only baseline has no tuning mode."""
    mode = searched.get("tuning_mode")
    return PTuneConfig(pre_seq_len=int(searched["pre_seq_len"]) if mode else 0, tuning_mode=mode)


def prompt_init_tokens(init: str, ptune: PTuneConfig, tokenizer: Any, task: TaskData, seed: int) -> Optional[list[int]]:
    """The tokens a trial's prompt starts from (see ``models.prompt_init``); the same for a retried trial."""
    train = task.train
    return initial_prompt_tokens(
        init, ptune.pre_seq_len, tokenizer, task.label_names, train.input_ids, train.attention_mask, seed
    )


class PromptTuningTrial(tune.Trainable):
    """Tune config: ``tuning_mode``, ``pre_seq_len``, ``lr``, ``prompt_init`` (or ``baseline_lrs`` for the
    head-only baseline); ``settings`` comes via ``tune.with_parameters``."""

    def setup(self, config: dict[str, Any], settings: TrialSettings) -> None:
        self.setup_started = time.time()
        resources = self.trial_resources  # None outside Tune (a trial built directly, as in tests)
        torch.set_num_threads(max(1, int(resources.required_resources.get("CPU", 1) if resources else 1)))
        torch.manual_seed(settings.seed)
        self.settings = settings
        self.task = settings.task
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        self.ptune = ptune_config_of(config)
        self.model = build_classifier(
            settings.model_path,
            self.task.num_labels,
            self.tokenizer.pad_token_id,
            self.ptune,
            settings.swarm,
        )
        self._start_trial(config)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """Tune reuses this actor for its next trial: the swarm connection, tokenizer, task and frozen
        weights stay; prompts, head, optimizer and data order start again as in a fresh actor's ``setup``.

        Always True: every trial of a search has the same settings (``tune.with_parameters``), so any of its
        actors can take any of its trials. A reset that fails raises, which fails the trial, and Tune ends
        the actor of a failed trial (in Ray 2.60 a False would fail the trial too, with no retry)."""
        self.setup_started = time.time()
        torch.manual_seed(self.settings.seed)
        self.ptune = ptune_config_of(new_config)
        self.model = self.model.rebuilt(**dataclasses.asdict(self.ptune))
        self._start_trial(new_config)
        return True

    def _start_trial(self, config: dict[str, Any]) -> None:
        """The per-trial state, on a model just built from the seed."""
        settings = self.settings
        self.task = settings.task_of(config)
        if self.ptune.tuning_mode:
            init = config.get("prompt_init", "random")
            apply_prompt_init(
                self.model.model, prompt_init_tokens(init, self.ptune, self.tokenizer, self.task, settings.seed)
            )
            self._start_head(config.get("head", "linear"))
        self.sweep = HeadSweep(self.model, config["baseline_lrs"]) if config.get("baseline_lrs") else None
        if self.sweep is not None:
            self.optimizer = self.sweep.optimizer
        else:
            head = list(self.model.score.parameters())
            prompts = [p for p in trainable_parameters(self.model) if all(p is not q for q in head)]
            head_lr = settings.head_lr if settings.head_lr is not None else config["lr"]
            groups = [{"params": prompts, "lr": config["lr"]}, {"params": head, "lr": head_lr}]
            self.optimizer = torch.optim.AdamW(groups)
        self.steps_done = 0
        self.latest_result: dict[str, Any] = {}
        self.batches = self.task.train_batches(settings.batch_size, settings.seed)
        self.best: Optional[dict[str, Any]] = None  # the best evaluation on the whole validation split
        self.best_tensors: dict[str, torch.Tensor] = {}
        self.setup_s = time.time() - self.setup_started

    def _start_head(self, head: str) -> None:
        settings = self.settings
        if head == "label_words":
            if settings.label_word_tokens is None:
                raise ValueError("a trial with head 'label_words' needs TrialSettings.label_word_tokens")
            apply_label_word_head(self.model, settings.label_word_tokens)
        elif settings.start_head is not None:
            with torch.no_grad():
                self.model.score.weight.copy_(settings.start_head)

    def step(self) -> dict[str, Any]:
        settings = self.settings
        if self.steps_done >= settings.max_steps:
            return dict(self.latest_result)  # restored from its final checkpoint: nothing left to train
        window = min(settings.eval_every, settings.max_steps - self.steps_done)
        losses, tokens, started = [], 0, time.perf_counter()
        for _ in range(window):
            batch = next(self.batches)
            result = self.sweep.train_step(batch) if self.sweep else train_step(self.model, self.optimizer, batch)
            losses.append(result.loss)
            tokens += result.tokens
        train_seconds = time.perf_counter() - started
        self.steps_done += window
        finished = self.steps_done >= settings.max_steps
        validation = self.task.validation if finished else self.task.validation.head(settings.rung_validation_size)
        started = time.perf_counter()
        extra: dict[str, Any] = {}
        if self.sweep is not None:
            chosen, evaluation = self.sweep.evaluate(self.task.validation, settings.eval_batch_size, len(validation))
            extra["baseline_lr"] = self.sweep.lrs[chosen]
        else:
            evaluation = evaluate(self.model, validation, settings.eval_batch_size)
        eval_seconds = time.perf_counter() - started
        if len(validation) == len(self.task.validation):
            self._keep_if_best(evaluation)
        best = self.best or {"val_accuracy": evaluation.accuracy, "val_loss": evaluation.loss, "step": self.steps_done}
        self.latest_result = {
            "step": self.steps_done,
            "train_loss": sum(losses) / len(losses),
            "train_losses": losses,
            "val_loss": best["val_loss"],
            "val_accuracy": best["val_accuracy"],
            "best_step": best["step"],
            "eval_loss": evaluation.loss,
            "eval_accuracy": evaluation.accuracy,
            "val_examples": len(validation),
            "tokens_per_s": tokens / train_seconds,
            "train_tokens": tokens,
            # where a trial's time goes (benchmarks/search_efficiency.py): its actor's setup, then per result
            "setup_s": self.setup_s,
            "setup_started": self.setup_started,
            "train_s": train_seconds,
            "eval_s": eval_seconds,
            "reported_at": time.time(),
            **extra,
            "finished": finished,
            "done": finished,
        }
        return dict(self.latest_result)  # Tune adds its own keys to what it gets

    def _trained_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def _keep_if_best(self, evaluation: Evaluation) -> None:
        """Keep this evaluation's tensors when it beats the best so far (accuracy, then loss)."""
        if self.best is not None and (evaluation.accuracy, -evaluation.loss) <= (
            self.best["val_accuracy"],
            -self.best["val_loss"],
        ):
            return
        self.best = {"val_accuracy": evaluation.accuracy, "val_loss": evaluation.loss, "step": self.steps_done}
        self.best_tensors = self._trained_tensors()

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        folder = Path(checkpoint_dir)
        current = self._trained_tensors()
        best = self.best_tensors or current
        head_prefix = f"{self.model.trainable_head}."
        save_file({k: v for k, v in best.items() if not k.startswith(head_prefix)}, folder / PROMPT_FILE)
        save_file({k: v for k, v in best.items() if k.startswith(head_prefix)}, folder / HEAD_FILE)
        save_file(current, folder / CURRENT_FILE)
        (folder / PTUNE_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.ptune)))
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
        state = {"step": self.steps_done, "latest_result": self.latest_result, "best": self.best}
        (folder / STATE_FILE).write_text(json.dumps(state))
        if self.sweep is not None:
            save_file(self.sweep.state_dict(), folder / SWEEP_FILE)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        folder = Path(checkpoint_dir)
        unexpected = self.model.load_state_dict(load_file(folder / CURRENT_FILE), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"checkpoint {folder} holds tensors this trial's model lacks: {unexpected}")
        if self.sweep is not None:
            self.sweep.load_state_dict(load_file(folder / SWEEP_FILE))
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE))
        state = json.loads((folder / STATE_FILE).read_text())
        self.steps_done, self.latest_result, self.best = state["step"], state["latest_result"], state["best"]
        self.best_tensors = {**load_file(folder / PROMPT_FILE), **load_file(folder / HEAD_FILE)} if self.best else {}
        self.batches = self.task.train_batches(self.settings.batch_size, self.settings.seed)
        for _ in range(self.steps_done):  # the same data order as a run that never stopped
            next(self.batches)
        print(
            f"resumed trial at step {self.steps_done} from {folder.name}", flush=True
        )  # Ray forwards it to the driver

    def cleanup(self) -> None:
        self.model.close()
        # Nothing of the trial is left to lose: the raylet's SIGTERM to an exiting actor now ends the process
        # at once, instead of Ray's handler raising SystemExit into whatever runs then (a traceback in the log).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
