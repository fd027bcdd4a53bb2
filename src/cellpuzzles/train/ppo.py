"""Actor-critic PPO with the Cell-o1 batch reward, through TRL's maintained trainer
(``trl.experimental.ppo.PPOTrainer``; trl is pinned to 1.12 because 1.13 removed it).

What TRL does here, unchanged: rollouts from the policy, a value model (the policy
checkpoint with a one-output score head), per-token KL to the frozen reference policy
folded into the reward (``kl_coef``), GAE, the clipped policy ratio and the clipped value
loss. What this module adds: the rule reward as a "reward model" TRL can call
(``RuleRewardModel``), the mapping from ``RLOptions`` to ``PPOConfig``, logging of the
reward spread / format ratio / completion length, validation accuracy, and the final save.
For a model trained on scaffold traces (``--rollout auto`` or ``scaffold``) the policy's
``generate`` writes scaffold rollouts (``ScaffoldGenerate``): TRL calls it as it calls
``generate`` and gets sequences and scores in the same shapes. A forward hook on the policy
and the reference (``ppo_env_tokens.EnvTokens``) then makes the scaffold's tokens the
environment's: only the sampled types are actions, over the candidates still free.

Advantages: GAE with gamma = lambda = 1 (verl's defaults, the framework of Cell-o1's PPO),
so each decision's advantage is the batch reward (plus the later KL terms) minus the critic's
value: with one terminal reward after many environment tokens per decision (measured:
docs/training.md), a freshly initialised critic's errors get no place to bias it. TRL's
default lambda 0.95 would discount the reward by 0.95 per scaffold token, cell after cell,
and lean on the critic.

Resume: TRL 1.12's ``PPOTrainer.train()`` takes no ``resume_from_checkpoint`` and its
checkpoints (``save_steps``) hold the policy, optimizer, scheduler and trainer state but not
the value model. So ``_SaveValue`` writes the value model into each checkpoint
(``checkpoint-N/value``), and with ``opt.resume`` a run whose ``<out>.ckpt`` holds a complete
checkpoint continues from it: the policy and value weights and the optimizer state are
loaded, the step counter starts at N, and the remaining steps run with the linear schedule
continued (initial rate ``lr * (T - N) / T`` decaying to 0, the same rates as an unbroken
run). The prompt order and the rollout sampling start afresh (TRL's data iterator cannot be
fast-forwarded), which a warning says. The reference policy stays ``model_path``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from cellpuzzles.core.errors import CellPuzzlesError
from cellpuzzles.inference.folder import PromptOptions, load_model, save
from cellpuzzles.inference.prompting import prompt_text
from cellpuzzles.task.puzzle import Puzzle, is_well_formed
from cellpuzzles.task.reward import batch_reward
from cellpuzzles.train.callbacks import MetricsLogger, ValidationAccuracy
from cellpuzzles.train.checkpoints import latest_checkpoint
from cellpuzzles.train.lora import lora
from cellpuzzles.train.ppo_env_tokens import EnvTokens, ids_key
from cellpuzzles.train.presets import rl_for
from cellpuzzles.train.rl_common import RLOptions, completion_budget, resolve_rollout, trainer_args
from cellpuzzles.train.scaffold_rollout import ScaffoldGenerate

# PPO's inner loop: passes over each rollout batch. TRL's default of 4 on a GPU; 2 on CPU,
# the fewest that still exercises the clipped ratio (the first pass is exactly on-policy,
# ratio 1, so with a single pass the clip could never act). One mini-batch: the whole
# rollout batch (prompts_per_step) is one optimizer step per pass.
PPO_EPOCHS_GPU = 4
PPO_EPOCHS_CPU = 2
NUM_MINI_BATCHES = 1
GAE_LAMBDA = 1.0  # Monte Carlo returns with the critic as baseline (see the module docstring)


@dataclass
class _RewardOutput:
    hidden_states: tuple[torch.Tensor, ...]


class _Backbone(nn.Module):
    """What ``get_reward`` runs as the "language model backbone": returns the rule reward of
    each row broadcast over the sequence as the last hidden state, shape [B, T, 1]."""

    def __init__(self, rewards_fn):
        super().__init__()
        self._rewards_fn = rewards_fn  # a bound method, not a Module: no submodule cycle

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        r = self._rewards_fn(input_ids, attention_mask)  # [B] float32 on input_ids.device
        return _RewardOutput(hidden_states=(r[:, None, None].expand(-1, input_ids.shape[1], 1).contiguous(),))


class RuleRewardModel(nn.Module):
    """ADAPTER so TRL's PPOTrainer can use the rule-based Cell-o1 reward as its reward model.

    TRL's ``get_reward(model, query_responses, pad_token_id, context_length)`` does
    ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=..., position_ids=...,
    output_hidden_states=True, ...)`` and then ``model.score(output.hidden_states[-1])``, reading
    the value at each row's last non-pad token. Here the backbone computes, for each row,
    ``cellpuzzles.task.reward.batch_reward(response_text, gold)`` and fills a [B, T, 1] float32
    tensor with it; ``score`` is the identity. Nothing is learned: the module has no parameters.

    Splitting prompt from response: ``get_reward`` does not pass ``context_length`` to the
    backbone, so each row's prompt is found by its token ids. Queries are left-padded, so the
    prompt starts at the first attended token; the adapter knows every training prompt's ids
    (the exact ids in the PPO dataset, hashed) and matches the one that prefixes the row. The
    response is what follows, cut at the first padding position (where TRL itself ends the
    sequence) and at the first EOS (``<|im_end|>`` for ChatML), then decoded with
    ``skip_special_tokens=True``: the same text GRPO's reward functions see.

    Per call it also records each row's reward, whether the completion is well formed, and its
    length in tokens; ``drain()`` returns and clears what was recorded since the last drain.
    """

    base_model_prefix = "backbone"

    def __init__(self, tokenizer, prompts: list[list[int]], answers: list[str]):
        super().__init__()
        self.tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.gold: dict[bytes, str] = {}
        for ids, a in zip(prompts, answers):
            self.gold[ids_key(ids)] = a
        self.lengths = sorted({len(ids) for ids in prompts})
        self.backbone = _Backbone(self.rewards)
        self.score = nn.Identity()
        self._stats: list[tuple[float, bool, int]] = []

    @classmethod
    def from_puzzles(cls, tokenizer, puzzles: list[Puzzle], prompt: PromptOptions) -> RuleRewardModel:
        ids = [prompt_ids(tokenizer, prompt.apply(p)) for p in puzzles]
        return cls(tokenizer, ids, [p.answer_text for p in puzzles])

    def split(self, ids: list[int]) -> tuple[str, list[int]]:
        """(gold answer, response ids) of one unpadded query+response row."""
        row = np.asarray(ids, dtype=np.int64)
        for n in self.lengths:  # one hash per distinct prompt length, not per prompt
            if n > len(ids):
                break
            gold = self.gold.get(ids_key(row[:n]))
            if gold is not None:
                return gold, ids[n:]
        head = self.tok.decode(ids[:80], skip_special_tokens=False)
        raise CellPuzzlesError(f"PPO reward: a rollout's prompt is not one of the training prompts ({head!r}...)")

    def response_text(self, response_ids: list[int]) -> str:
        if self.eos_token_id is not None and self.eos_token_id in response_ids:
            response_ids = response_ids[: response_ids.index(self.eos_token_id)]
        return self.tok.decode(response_ids, skip_special_tokens=True)

    @torch.no_grad()
    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = []
        for row, mask in zip(input_ids.tolist(), attention_mask.bool().tolist()):
            start = mask.index(True) if True in mask else len(mask)
            # the row ends at its first padding position after the prompt start (TRL's view)
            end = mask.index(False, start) if False in mask[start:] else len(mask)
            gold, resp = self.split(row[start:end])
            text = self.response_text(resp)
            r = batch_reward(text, gold)
            self._stats.append((r, is_well_formed(text), len(resp)))
            out.append(r)
        return torch.tensor(out, dtype=torch.float32, device=input_ids.device)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.score(self.backbone(input_ids, attention_mask).hidden_states[-1])

    def drain(self) -> dict[str, float]:
        stats, self._stats = self._stats, []
        if not stats:
            return {}
        r = torch.tensor([s[0] for s in stats], dtype=torch.float64)
        return {
            "reward_mean": float(r.mean()),
            "reward_std": float(r.std(unbiased=False)),
            "format_ratio": sum(s[1] for s in stats) / len(stats),
            "completion_length": sum(s[2] for s in stats) / len(stats),
        }


def prompt_ids(tok, puzzle: Puzzle) -> list[int]:
    """The prompt's token ids exactly as generation sees them (chat template, generation prompt)."""
    return tok(prompt_text(tok, puzzle), add_special_tokens=False)["input_ids"]


class _RewardStats(TrainerCallback):
    """After TRL logs a PPO step (objective/kl, objective/scores, ...), record what TRL does
    not: the rule reward's mean and spread, the format ratio and the completion length."""

    def __init__(self, reward_model: RuleRewardModel, logger: MetricsLogger):
        self.rm = reward_model
        self.logger = logger

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "objective/scores" in logs:
            stats = self.rm.drain()
            if stats:
                self.logger.record(stats, state.global_step)


class _SaveValue(TrainerCallback):
    """TRL saves only the policy in a checkpoint; save the value model beside it."""

    def on_save(self, args, state, control, model=None, **kwargs):
        value = getattr(model, "value_model", None)
        if value is not None:
            value.save_pretrained(Path(args.output_dir) / f"checkpoint-{state.global_step}" / "value")


class _StartAt(TrainerCallback):
    """A resumed run counts its steps on from the checkpoint's (PPOTrainer resets them to 0)."""

    def __init__(self, step: int, total: int):
        self.step, self.total = step, total

    def on_train_begin(self, args, state, control, **kwargs):
        state.global_step, state.max_steps = self.step, self.total


class _PolicyValidation(ValidationAccuracy):
    """PPOTrainer hands callbacks its policy+value wrapper; validate the policy inside it."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        super().on_step_end(args, state, control, model=getattr(model, "policy", model), **kwargs)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        super().on_train_end(args, state, control, model=getattr(model, "policy", model), **kwargs)


def train_ppo(train: list[Puzzle], val: list[Puzzle], model_path: str | os.PathLike, out: str | os.PathLike,
              opt: RLOptions, logger: MetricsLogger | None = None) -> Path:
    """PPO from ``model_path`` on ``train`` with the batch reward; writes the model folder ``out``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if opt.rollout == "vllm":
        raise CellPuzzlesError("--rollout vllm: TRL's PPOTrainer generates with the policy itself; use --algo grpo "
                               "for vLLM rollouts, or --rollout hf")
    if len(train) < opt.prompts_per_step:
        # TRL's dataloader drops the last partial batch: with fewer prompts than one batch
        # it would yield nothing, and PPOTrainer's endless data iterator would spin forever
        raise CellPuzzlesError(f"PPO needs at least prompts_per_step={opt.prompts_per_step} training puzzles, "
                               f"got {len(train)}")
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    model, tok, prompt = load_model(model_path)
    opt = rl_for(opt, prompt.kind)  # unset options: the model kind's defaults (train/presets.py)
    rollout = resolve_rollout(opt.rollout, prompt)
    dtype = model.dtype
    use_lora = opt.use_lora  # resolved per model kind by train_rl (train/presets.py)
    ckpt = Path(f"{out}.ckpt")
    # the newest checkpoint holding the policy, the optimizer and the value model
    start = latest_checkpoint(ckpt, ("optimizer.pt", "value/config.json"), skip_incomplete=True,
                              what="PPO checkpoint") if opt.resume else None
    done = start[1] if start else 0
    if start:
        warnings.warn(f"PPO resumes from {start[0]} (step {done} of {opt.max_steps}): weights, optimizer and "
                      "learning-rate schedule continue; prompt order and rollout sampling start afresh", stacklevel=2)
    if use_lora:
        if start:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(start[0]), is_trainable=True)
        else:
            model = lora(model, r=opt.lora_r, alpha=2 * opt.lora_r, seed=opt.seed)
        ref = None  # PPOTrainer uses the policy with its adapter disabled: the starting policy
    else:
        if start:
            model = AutoModelForCausalLM.from_pretrained(str(start[0]), dtype=dtype, local_files_only=True)
        ref = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, local_files_only=True)
    if done >= opt.max_steps:  # the run had finished: its last checkpoint is the result
        final = model.merge_and_unload() if use_lora else model
        return save(final, tok, out, prompt)
    # the critic: the policy checkpoint with a fresh one-output score head, trained in full
    # (on resume: the value model saved in the checkpoint)
    set_seed(opt.seed)  # the score head starts random: seeded, so a rerun gives the same weights
    value = AutoModelForSequenceClassification.from_pretrained(
        str(start[0] / "value" if start else model_path), num_labels=1, dtype=dtype, local_files_only=True)
    value.config.pad_token_id = tok.pad_token_id

    shown = [prompt.apply(p) for p in train]
    ids = [prompt_ids(tok, p) for p in shown]
    if any(tok.pad_token_id in x for x in ids):
        # TRL masks every pad id as padding: a prompt holding one (pad == an EOS the chat
        # template uses) would be cut in the middle by PPOTrainer itself
        raise CellPuzzlesError(f"PPO: the pad token {tok.pad_token!r} occurs inside the prompts (pad = a chat "
                               "template token); give the tokenizer a distinct pad token")
    ds = Dataset.from_dict({"input_ids": ids}).shuffle(seed=opt.seed)
    reward_model = RuleRewardModel(tok, ids, [p.answer_text for p in shown])
    env = None
    if rollout == "scaffold":  # the policy's generate writes scaffold rollouts (train/scaffold_rollout.py)
        # only the sampled types are the policy's actions; the scaffold is the environment's
        env = EnvTokens(tok.pad_token_id).attach(model, ref)
        model.generate = ScaffoldGenerate(model, tok, {tuple(x): p for x, p in zip(ids, shown)},
                                          prompt.restated_genes, opt.seed, env)
    logger = logger or MetricsLogger("rl")
    args = trainer_args(opt, str(ckpt))
    args["learning_rate"] = opt.learning_rate * (opt.max_steps - done) / opt.max_steps  # the linear decay, continued
    cfg = PPOConfig(
        **args,
        total_episodes=(opt.max_steps - done) * opt.prompts_per_step,  # one rollout per prompt: one PPO step each
        per_device_train_batch_size=opt.prompts_per_step,
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=opt.prompts_per_step,
        num_mini_batches=NUM_MINI_BATCHES,
        num_ppo_epochs=PPO_EPOCHS_GPU if cuda else PPO_EPOCHS_CPU,
        kl_coef=opt.beta,
        gamma=1.0,
        lam=GAE_LAMBDA,
        response_length=completion_budget(train, opt, tok, prompt),
        stop_token="eos",
        missing_eos_penalty=None,  # the rule reward already gives -1 to anything cut off mid-format
        num_sample_generations=0,  # validation is ValidationAccuracy's job
        bf16=bf16,
        gradient_checkpointing=False,  # PPOTrainer.train() never turns it on anyway
    )
    shown_val = [prompt.apply(p) for p in val[: opt.val_size]]
    trainer = PPOTrainer(
        args=cfg, processing_class=tok, model=model, ref_model=ref, reward_model=reward_model,
        train_dataset=ds, value_model=value,
        callbacks=[_StartAt(done, opt.max_steps), _SaveValue(), logger, _RewardStats(reward_model, logger),
                   _PolicyValidation(shown_val, tok, logger, every=opt.eval_steps, restated_genes=prompt.restated_genes,
                                     tokens_per_cell=prompt.tokens_per_cell)],
    )
    if start:
        try:
            state = torch.load(start[0] / "optimizer.pt", map_location="cpu", weights_only=True)
            trainer.optimizer.load_state_dict(state)
        except Exception as e:  # a truncated or foreign file: say which, not a torch traceback
            raise CellPuzzlesError(f"{start[0]}/optimizer.pt is corrupt ({type(e).__name__}); delete {start[0]} to "
                                   "resume from the checkpoint before it") from None
    try:
        trainer.train()
    finally:
        if env is not None:
            env.detach()
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    policy.__dict__.pop("generate", None)  # the class's own generate again
    final = policy.merge_and_unload() if use_lora else policy
    return save(final, tok, out, prompt)
