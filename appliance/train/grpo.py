"""Group relative policy optimisation (GRPO): reinforcement tuning with reward functions.

For each prompt of a batch the policy samples `grpo.group_size` answers; each answer is scored by the
recipe's rewards (`rewards.py`) and judged against its own group: advantage = (reward - group mean) /
(group std + eps). The loss per answer is

    -advantage * mean log pi(answer tokens) + kl_beta * mean KL(pi || ref) per answer token

(one update per sample, so the clipped ratio of PPO is 1 and drops out; the KL is the k3 estimator). The
reference is the base, handled as for DPO: the policy with its adapters off for LoRA/QLoRA, a frozen copy
for full training. Rows come from the launcher like any other stage: [prompt ids | reference answer ids]
in the labels of a 2 x seq_len row, so prompts never leave the vault as files.

The validation loss of a grpo run is minus the mean reward of the greedy answer to each held-out prompt.

Agentic tasks (`data.format = "task"`): each row is an episode of the task. Each of the group's samples
plays the episode out, turn by turn, in the tool-calling loop of `appliance.tasks` (tools run in the
sandbox); the reward is 1 when the episode succeeds, else 0. Every model turn of an episode shares its
advantage, and the turns' tokens are scored in their own contexts, all in one forward pass. Tools that
hang or sandboxes that fail end their episode as failed and are counted in the run's summary.
"""

from __future__ import annotations

from appliance.train import rewards as R

IGNORE = -100


class GRPO:
    def __init__(self, cfg, tokenizer, reference=None, seed: int = 0, rank: int = 0, task=None,
                 system_prompt: str = "", generator: Generator | None = None):
        self.cfg, self.tok, self.reference = cfg, tokenizer, reference
        self.generator = generator or Generator()
        self._sampler = None  # the generator's model, refreshed once per `losses` / `val_losses` call
        self.task, self.system_prompt = task, system_prompt
        self.episodes = {"played": 0, "succeeded": 0, "tool_calls": 0, "tool_errors": 0}
        self.seed, self.rank, self.step = seed, rank, 0
        self.failures: dict = {}
        self._rewards: list[float] = []
        self.history: list[float] = []  # mean reward per step, on this process
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else tokenizer.eos_token_id
        ends = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")}
        self.stop = sorted({tokenizer.eos_token_id} | {e for e in ends if isinstance(e, int) and e >= 0
                                                        and e != tokenizer.unk_token_id})
        self._calls = 0

    # --- the loop's side ----------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        self.step, self._calls = step, 0

    def losses(self, model, x, y):
        """Per-prompt loss, shape (b,): sample, score, and the policy-gradient + KL loss of the group."""
        import torch

        prompts, answers = self._split(y)
        g = self.cfg.group_size
        self._sampler = None  # the policy changed since the last samples: merge again
        if self.task is not None:
            return self._task_losses(model, answers, g)
        seqs, attn, plen, mask = self._sample(model, prompts, g, greedy=False)
        texts = self._texts(seqs, plen, mask)
        scores = torch.tensor([R.score(self.cfg.rewards, t, answers[i // g], self.cfg, self.failures)
                               for i, t in enumerate(texts)], dtype=torch.float32, device=seqs.device).view(-1, g)
        self._rewards += scores.flatten().tolist()
        adv = group_advantages(scores)
        policy = token_logps(model, seqs, attn, plen, self.cfg.temperature)
        with torch.no_grad():
            ref = self._reference_logps(model, seqs, attn, plen)
        n = mask.sum(-1).clamp(min=1)
        delta = ref - policy
        kl = torch.exp(delta) - delta - 1
        per_answer = (-adv * (policy * mask).sum(-1) + self.cfg.kl_beta * (kl * mask).sum(-1)) / n
        return per_answer.view(-1, g).mean(-1)

    def val_losses(self, model, x, y):
        """Minus the reward of each prompt's greedy answer."""
        import torch

        prompts, answers = self._split(y)
        self._sampler = None
        if self.task is not None:
            eps, _ = self._play(model, [int(a) for a in answers], greedy=True)
            return -torch.tensor([float(e.success) for e in eps], device=device_of(model))
        seqs, _, plen, mask = self._sample(model, prompts, 1, greedy=True)
        texts = self._texts(seqs, plen, mask)
        return -torch.tensor([R.score(self.cfg.rewards, t, a, self.cfg, self.failures) for t, a in zip(texts, answers)],
                             device=seqs.device)

    def step_metrics(self) -> dict:
        mean = sum(self._rewards) / len(self._rewards) if self._rewards else None
        self._rewards = []
        if mean is not None:
            self.history.append(mean)
        return {"reward": mean}

    def summary(self) -> dict:
        h = self.history
        out = {"first_reward": h[0] if h else None, "last_reward": h[-1] if h else None,
               "reward_failures": self.failures}
        if self.task is not None:
            out["episodes"] = self.episodes
        return out

    # --- agentic tasks ------------------------------------------------------------------------------
    def _task_losses(self, model, answers: list[str], g: int):
        import torch

        eps, segs = self._play(model, [int(a) for a in answers for _ in range(g)], greedy=False)
        for e in eps:  # training plays only: validation's greedy plays are its loss, not the summary
            self._count(e)
        scores = torch.tensor([float(e.success) for e in eps], dtype=torch.float32).view(-1, g)
        self._rewards += scores.flatten().tolist()
        if not segs:  # every play ended before the model spoke (context): nothing to learn, a zero loss
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return zero.repeat(len(answers))
        adv = group_advantages(scores)
        seqs, attn, plen, mask = self._batch(segs, device_of(model))
        policy = token_logps(model, seqs, attn, plen, self.cfg.temperature)
        with torch.no_grad():
            ref = self._reference_logps(model, seqs, attn, plen)
        delta = ref - policy
        kl = torch.exp(delta) - delta - 1
        owner = torch.tensor([k for k, _, _ in segs], device=policy.device)
        lp = torch.zeros(len(eps), device=policy.device).index_add(0, owner, (policy * mask).sum(-1))
        kls = torch.zeros(len(eps), device=policy.device).index_add(0, owner, (kl * mask).sum(-1))
        n = torch.zeros(len(eps), device=policy.device).index_add(0, owner, mask.sum(-1)).clamp(min=1)
        adv = adv.to(policy.device)
        return ((-adv * lp + self.cfg.kl_beta * kls) / n).view(-1, g).mean(-1)

    def _play(self, model, indexes: list[int], greedy: bool):
        """Episodes played side by side, a model turn at a time; returns them and every turn as
        (episode position, prompt ids, answer ids)."""
        from appliance.tasks import Episode

        eps = [Episode(self.task, i) for i in indexes]
        segs: list[tuple[int, list[int], list[int]]] = []
        limit = getattr(getattr(model, "module", model).config, "max_position_embeddings", None)
        while active := [k for k, e in enumerate(eps) if not e.done]:
            prompts = {k: self._encode(eps[k].prompt()) for k in active}
            for k in active:
                if limit and len(prompts[k]) + self.cfg.max_new_tokens > limit:
                    eps[k].fail(f"the conversation outgrew the model's context ({len(prompts[k])} tokens)")
            if not (active := [k for k in active if not eps[k].done]):
                break
            prompts = [prompts[k] for k in active]
            seqs, _, plen, mask = self._sample(model, prompts, 1, greedy)
            texts = self._texts(seqs, plen, mask)
            for j, k in enumerate(active):
                segs.append((k, prompts[j], seqs[j, plen:plen + int(mask[j].sum())].tolist()))
                eps[k].step(texts[j])
        return eps, segs

    def _count(self, e) -> None:
        c = self.episodes
        c["played"] += 1
        c["succeeded"] += e.success
        c["tool_calls"] += len(e.calls)
        c["tool_errors"] += sum(not call["ok"] for call in e.calls)
        if e.reason and e.calls and e.calls[-1].get("fatal"):  # a hung tool or a failed sandbox: listed
            f = self.failures.setdefault(f"tool {e.calls[-1]['tool']}", {"count": 0, "first": e.reason[:200]})
            f["count"] += 1

    def _encode(self, prompt: str) -> list[int]:
        from appliance.train.data import conversation

        text = self.tok.apply_chat_template(conversation(self.system_prompt, prompt), tokenize=False,
                                            add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _batch(self, segs, device):
        """Turns as one batch: prompts left-padded to a common length, answers right-padded and masked."""
        import torch

        plen = max(len(p) for _, p, _ in segs)
        alen = max(1, max(len(a) for _, _, a in segs))
        ids = torch.full((len(segs), plen + alen), self.pad, dtype=torch.long)
        attn = torch.zeros((len(segs), plen + alen), dtype=torch.long)
        mask = torch.zeros((len(segs), alen))
        for i, (_, p, a) in enumerate(segs):
            ids[i, plen - len(p):plen] = torch.tensor(p)
            attn[i, plen - len(p):plen] = 1
            if a:
                ids[i, plen:plen + len(a)] = torch.tensor(a)
                attn[i, plen:plen + len(a)] = 1
                mask[i, :len(a)] = 1
        return ids.to(device), attn.to(device), plen, mask.to(device)

    # --- pieces -------------------------------------------------------------------------------------
    def _split(self, y) -> tuple[list[list[int]], list[str]]:
        half = y.shape[1] // 2
        prompts, answers = [], []
        for row in y.tolist():
            prompts.append([t for t in row[:half] if t != IGNORE])
            answers.append(self.tok.decode([t for t in row[half:] if t != IGNORE], skip_special_tokens=True))
        return prompts, answers

    def _sample(self, model, prompts: list[list[int]], g: int, greedy: bool):
        """Left-padded prompts, each followed by g sampled answers; the answers' mask stops after the first
        end-of-turn or end-of-text token."""
        import torch

        inner = getattr(model, "module", model)
        device = device_of(model)
        plen = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), plen), self.pad, dtype=torch.long)
        attn = torch.zeros((len(prompts), plen), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, plen - len(p):] = torch.tensor(p)
            attn[i, plen - len(p):] = 1
        # the same samples on a resume: the seed is a function of (seed, step, rank, call)
        import numpy as np

        torch.manual_seed(int(np.random.SeedSequence([self.seed, self.step, self.rank, self._calls])
                              .generate_state(1)[0]))
        self._calls += 1
        # FSDP2 gathers each layer in every forward, so every process must run as many: sharded, the answers
        # run to max_new_tokens without stopping, and the mask below ends each at its first stop token
        sharded = hasattr(inner, "set_requires_gradient_sync")
        if self._sampler is None:
            self._sampler = self.generator.refresh(model)  # LoRA merged, bf16 on a GPU (the policy when sharded)
        sampler = self._sampler
        was_training = sampler.training
        sampler.eval()
        static = {"cache_implementation": "static"} if self.generator.static and not sharded else {}
        with torch.no_grad():
            # plain sampling at the temperature, nothing the model's generation_config may add (repetition
            # penalties, n-gram bans): the loss scores exactly the distribution the answers came from
            out = sampler.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=not greedy,
                                   temperature=self.cfg.temperature if not greedy else None, top_p=None, top_k=None,
                                   repetition_penalty=None, no_repeat_ngram_size=None, min_new_tokens=None,
                                   max_new_tokens=self.cfg.max_new_tokens, num_return_sequences=g,
                                   pad_token_id=self.pad, eos_token_id=None if sharded else self.stop, **static)
        sampler.train(was_training)
        answer = out[:, plen:]
        stop = torch.isin(answer, torch.tensor(self.stop, device=answer.device))
        # keep tokens up to and including the first stop token
        after = (stop.cumsum(-1) - stop.long()) > 0
        mask = (~after).float()
        full_attn = torch.cat([attn.to(device).repeat_interleave(g, 0), (~after).long()], dim=1)
        return out, full_attn, plen, mask

    def _texts(self, seqs, plen: int, mask) -> list[str]:
        return [self.tok.decode([t for t, m in zip(row[plen:], keep) if m], skip_special_tokens=True)
                for row, keep in zip(seqs.tolist(), mask.tolist())]

    def _reference_logps(self, model, seqs, attn, plen):
        t = self.cfg.temperature
        if self.reference is not None:
            return token_logps(self.reference, seqs, attn, plen, t)
        inner = getattr(model, "module", model)
        with inner.disable_adapter():
            return token_logps(inner, seqs, attn, plen, t)


def group_advantages(scores):
    """(G groups, g samples) rewards -> each sample's advantage against its own group, flattened (G*g,)."""
    return ((scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-4)).flatten()


def device_of(model):
    """The device of a model's weights, unwrapped from DDP/FSDP first."""
    return next(getattr(model, "module", model).parameters()).device


def token_logps(model, seqs, attn, plen: int, temperature: float = 1.0):
    """log p of each answer token (positions plen..), shape (n, T), at `temperature` (the sampling one, for
    the policy-gradient term); left padding handled by the positions."""
    import torch

    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=seqs, attention_mask=attn, position_ids=positions, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, plen - 1:-1] / temperature, dim=-1)
    return logp.gather(-1, seqs[:, plen:].unsqueeze(-1)).squeeze(-1)


class Generator:
    """The policy as a plain model for sampling: LoRA merged into a copy of the base (a 4-bit QLoRA base
    dequantized), in `dtype` (bf16 on a GPU), refreshed from the policy before each batch of samples.

    Sampling through the policy itself runs every adapter's extra matmuls (and QLoRA's dequantization) in
    every decoding step; the copy runs the base's shape alone, in bf16, with a static key/value cache on a GPU
    (`static`), which also lets torch.compile keep its graphs across steps. Its weights are the policy's to
    float rounding, so greedy answers are the same (`tests/test_grpo.py`). An FSDP2-sharded policy is not
    copied (a whole copy on each process is what sharding avoids): it samples through itself.
    """

    def __init__(self, dtype: str = "float32", static: bool = False):
        self.dtype, self.static = dtype, static
        self.model = None

    def refresh(self, policy):
        """The copy, its weights set from `policy` (DDP-wrapped or not) now; the policy itself when sharded."""
        import torch

        inner = getattr(policy, "module", policy)
        if hasattr(inner, "set_requires_gradient_sync"):
            return inner
        base = inner.get_base_model() if hasattr(inner, "peft_config") else inner
        if self.model is None:
            self.model = self._build(base)
        target = dict(self.model.named_parameters())
        dtype = getattr(torch, self.dtype)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if "lora_" not in name:
                    target[name.replace(".base_layer", "")].copy_(_dequantized(p))  # casts to the copy's dtype
            for name, module in base.named_modules():
                if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                    for adapter in module.active_adapters:
                        if adapter in getattr(module, "lora_A", {}):
                            target[f"{name}.weight"].add_(module.get_delta_weight(adapter).to(dtype))
        return self.model

    def _build(self, base):
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(base.config)
        for key in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, key):
                delattr(config, key)
        device = next(base.parameters()).device
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, self.dtype),
                                                 attn_implementation=base.config._attn_implementation)
        model.generation_config = copy.deepcopy(base.generation_config)
        return model.to(device).eval().requires_grad_(False)


def _dequantized(p):
    """A weight as a plain tensor: a bitsandbytes 4-bit one dequantized."""
    if hasattr(p, "quant_state"):
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(p, state=p.quant_state)
    return p
