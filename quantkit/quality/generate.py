"""Greedy answers to the drift prompts from the bf16 original and from every artifact, and the drift check.

Every engine gets the same token ids (the prompts rendered once with the original tokenizer: its chat template for
instruct models, plain text for base models) and stops at the same token ids, so answers are comparable token for
token:

- bf16: the whole text model through transformers (`hf_greedy_many`), float32 weights when they fit in memory
  (the model's exact function, as for the reference logits), bf16 otherwise; CUDA when present. Computed once per
  workspace and prompt set, cached in ``eval/drift-reference-<fp>.json``.
- a scorer with ``generate_many(prompts, max_new, stop)`` (GGUF: llama.cpp, up to 32 sequences per batch, each
  with its own KV cache, see `quantkit.backends.gguf.llamacpp`) uses it; with ``generate(prompt, max_new, stop)``
  one prompt at a time;
- a scorer holding a transformers model (GPTQ) generates through that model like bf16 (`hf_greedy_many`);
- any other scorer (EXL2, third-party formats) recomputes the prefix each step through ``chunk_logits``.

Both batch: transformers 8 left-padded, masked prompts at a time (5-10x faster than one by one on the fixtures),
llama.cpp up to 32 sequences without padding (3-6x). On a CPU the weights are then read once per step for all of
them. Batched matrix products can round differently from one-row ones, which matters only on near-tied tokens: on
every trained fixture batched and one-at-a-time answers are identical (`tests/test_drift.py`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.quality import drift as measures
from quantkit.source import Checkpoint
from quantkit.workspace import Workspace, fingerprint, write_json_atomic

END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<eos>")
BASE_QUESTION = "Вопрос: {}\nОтвет:"
CONTINUE = "Продолжи текст:\n\n{}"


@dataclass(frozen=True)
class DriftSettings:
    """``quantkit eval --drift``: which prompts, how many, how long the answers, the gate."""

    prompts: str | None = None  # None: builtin:ru-drift; or a .jsonl / .txt file
    count: int | None = measures.DEFAULT_PROMPTS  # None: every prompt
    new_tokens: int = measures.DEFAULT_NEW_TOKENS
    max_drift: float | None = measures.DEFAULT_MAX_DRIFT


# -- prompts → token ids ----------------------------------------------------------------------------------

def render(prompts: list[measures.Prompt], tokenizer: Any, instruct: bool) -> list[list[int]]:
    """Token ids of every prompt: the chat template with a generation prompt (thinking off) for instruct models,
    ``Вопрос: …\\nОтвет:`` or the bare text (continuations) for base models."""
    out = []
    for p in prompts:
        if instruct and getattr(tokenizer, "chat_template", None):
            content = CONTINUE.format(p.text) if p.kind == "continuation" else p.text
            text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            text = p.text if p.kind == "continuation" else BASE_QUESTION.format(p.text)
            out.append(list(tokenizer(text)["input_ids"]))
    return out


def stop_ids(ckpt: Checkpoint, tokenizer: Any) -> set[int]:
    """Where every engine stops: the model's EOS ids (config, generation config, tokenizer) and end-of-turn
    tokens of the common chat formats that the vocabulary has."""
    ids: set[int] = set()

    def add(v: Any) -> None:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(x for x in v if isinstance(x, int))

    add(ckpt.config.get("eos_token_id"))
    add((ckpt.config.get("text_config") or {}).get("eos_token_id"))
    gen = Path(ckpt.path) / "generation_config.json"
    if gen.exists():
        try:
            add(json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for t in END_TOKENS:
        if t in vocab:
            ids.add(int(vocab[t]))
    return ids


# -- engines ------------------------------------------------------------------------------------------------

def _torch() -> Any:
    import torch

    threads = int(os.environ.get("QUANTKIT_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return torch


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def load_hf(ckpt: Checkpoint) -> tuple[Any, str]:
    """The bf16 checkpoint's text model, whole, in float32 when it fits (half of the free memory), else bf16."""
    torch = _torch()
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else _available_memory()
    dtype_name = "float32" if ckpt.n_params * 4 <= free // 2 else "bfloat16"
    if ckpt.n_params * 2 > free * 0.9:
        raise QuantkitError(f"the drift check holds {ckpt.name} whole in memory for its bf16 answers "
                            f"({ckpt.n_params * 2 / 2**30:.1f} GiB in bf16), more than the {free / 2**30:.1f} GiB free "
                            f"on {device}", "run quantkit eval without --drift here, or on a machine with more memory")
    dtype = getattr(torch, dtype_name)
    config = ckpt.arch.text_config(AutoConfig.from_pretrained(ckpt.path))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    names = ckpt.canonical_names
    state = {}
    for name, _ in model.named_parameters():
        full = name if name in names else ("model.embed_tokens.weight" if name == "lm_head.weight" else name)
        if full not in names:
            raise QuantkitError(f"{ckpt.name}: tensor {name} is missing from the checkpoint",
                                "drift generation needs every text-model tensor")
        state[name] = torch.from_numpy(ckpt.read_f32(full)).to(dtype)
    model.load_state_dict(state, strict=False)
    del state
    for child, module in model.model.named_children():
        ckpt.arch.fix_buffers(child, module)
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in dict(model.named_parameters()):
        model.tie_weights()
    return model.eval(), dtype_name


def hf_greedy(model: Any, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    """Greedy decoding with the model's KV cache: up to `max_new` tokens, the stop token included."""
    torch = _torch()
    device = next(model.parameters()).device
    # transformers ≥ 5.2x calls the KV cache `cache`; earlier releases `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[int] = []
    with torch.inference_mode():
        res = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        for _ in range(max_new):
            tok = int(res.logits[0, -1].float().argmax())
            out.append(tok)
            if tok in stop or len(out) == max_new:
                break
            past = getattr(res, "cache", None) if key == "cache" else res.past_key_values
            res = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, **{key: past})
    return out


def hf_greedy_many(model: Any, prompts: list[list[int]], max_new: int, stop: set[int], *, group: int = 8
                   ) -> list[list[int]]:
    """Greedy decoding of `group` prompts at a time: left-padded, masked, positions counted from each prompt's
    first token, one KV cache. The same function as `hf_greedy` per prompt; the arithmetic of padded batches may
    round differently on near-ties."""
    torch = _torch()
    device = next(model.parameters()).device
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[list[int]] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), group):
            part = prompts[start : start + group]
            width = max(len(p) for p in part)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in part], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part], device=device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            outs: list[list[int]] = [[] for _ in part]
            for _ in range(max_new):
                nxt = res.logits[:, -1].float().argmax(-1).tolist()
                for o, t in zip(outs, nxt, strict=True):
                    if not o or (o[-1] not in stop and len(o) < max_new):
                        o.append(int(t))
                if all(o[-1] in stop or len(o) >= max_new for o in outs):
                    break
                mask = torch.cat([mask, mask.new_ones((len(part), 1))], -1)
                pos = pos[:, -1:] + 1
                past = getattr(res, "cache", None) if key == "cache" else res.past_key_values
                res = model(input_ids=torch.tensor(nxt, device=device)[:, None], attention_mask=mask,
                            position_ids=pos, use_cache=True, **{key: past})
            out += outs
    return out


def scorer_greedy(scorer: Any, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    """Greedy decoding through any scorer's ``chunk_logits`` (the whole prefix every step: slow, but universal)."""
    seq = list(prompt)
    out: list[int] = []
    for _ in range(max_new):
        logits = scorer.chunk_logits(np.asarray(seq, dtype=np.int64), len(seq) - 1)
        tok = int(np.asarray(logits)[-1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok in stop:
            break
    return out


def _is_hf(model: Any) -> bool:
    return model is not None and hasattr(model, "config") and hasattr(model, "parameters")


def generator_for(scorer: Any) -> Callable[[list[int], int, set[int]], list[int]]:
    """The fastest greedy decoder a scorer allows (its own, its transformers model's, or through its logits)."""
    if callable(getattr(scorer, "generate", None)):
        return scorer.generate  # type: ignore[no-any-return]
    model = getattr(scorer, "model", None)
    if _is_hf(model):
        return lambda p, n, s: hf_greedy(model, p, n, s)
    return lambda p, n, s: scorer_greedy(scorer, p, n, s)


# -- the check ----------------------------------------------------------------------------------------------

def _answers(tokenizer: Any, outputs: list[list[int]], stop: set[int]) -> list[dict[str, Any]]:
    return [{"ids": ids, "text": tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True)}
            for ids in outputs]


class DriftCheck:
    """The drift check of one workspace: prompts rendered once, the bf16 answers cached, each artifact compared."""

    def __init__(self, ws: Workspace, ckpt: Checkpoint, tokenizer: Any, settings: DriftSettings) -> None:
        self.ws, self.ckpt, self.tok, self.settings = ws, ckpt, tokenizer, settings
        self.prompts = measures.load_prompts(settings.prompts, settings.count)
        self.spec = settings.prompts or measures.BUILTIN
        self.ids = render(self.prompts, tokenizer, ckpt.instruct)
        self.stop = stop_ids(ckpt, tokenizer)
        self.n_ctx = -(-(max(len(i) for i in self.ids) + settings.new_tokens + 1) // 64) * 64
        limit = (ckpt.config.get("text_config") or ckpt.config).get("max_position_embeddings")
        longest = max(len(i) for i in self.ids)
        if isinstance(limit, int) and longest + settings.new_tokens > limit:
            raise QuantkitError(f"drift prompts {self.spec}: the longest prompt has {longest:,} tokens; with "
                                f"{settings.new_tokens} new tokens that exceeds {ckpt.name}'s context of {limit:,}",
                                "shorten the prompt or use fewer --drift-tokens")
        digest = hashlib.sha256(json.dumps([self.ids, sorted(self.stop)]).encode()).hexdigest()[:16]
        self.fp = fingerprint("drift-reference", 2, ckpt.fingerprint, digest, settings.new_tokens)
        self._ref: list[dict[str, Any]] | None = None
        self.ref_info: dict[str, Any] = {}

    def summary(self) -> dict[str, Any]:
        """What the report says about the check as a whole."""
        return {"prompts": self.spec, "count": len(self.prompts), "new_tokens": self.settings.new_tokens,
                "instruct": self.ckpt.instruct, "max_drift": self.settings.max_drift,
                "mean_prompt_tokens": round(sum(map(len, self.ids)) / len(self.ids), 1),
                "bf16_dtype": self.ref_info.get("dtype"), "bf16_seconds": self.ref_info.get("seconds")}

    def _run(self, gen: Callable[[list[int], int, set[int]], list[int]], on_prompt: Any) -> list[list[int]]:
        outs = []
        for p in self.ids:
            outs.append(gen(p, self.settings.new_tokens, self.stop))
            if on_prompt:
                on_prompt()
        return outs

    def reference(self, on_prompt: Any = None) -> list[dict[str, Any]]:
        """bf16's answers (computed once, then read from the workspace)."""
        if self._ref is not None:
            return self._ref
        path = self.ws.root / "eval" / f"drift-reference-{self.fp}.json"
        if path.exists():  # written atomically under a name that holds its fingerprint
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            t0 = time.perf_counter()
            model, dtype = load_hf(self.ckpt)
            try:
                outs = []
                for start in range(0, len(self.ids), 8):
                    outs += hf_greedy_many(model, self.ids[start : start + 8], self.settings.new_tokens, self.stop)
                    for _ in range(len(outs) - start):
                        on_prompt and on_prompt()
            finally:
                del model
            data = {"dtype": dtype, "seconds": round(time.perf_counter() - t0, 2), "prompts": self.spec,
                    "new_tokens": self.settings.new_tokens, "answers": _answers(self.tok, outs, self.stop)}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, data)
        self._ref = data["answers"]
        self.ref_info = {k: data.get(k) for k in ("dtype", "seconds")}
        return self._ref

    def artifact(self, key: str, entry: dict[str, Any], backend: Any, on_prompt: Any = None,
                 on_reference: Any = None) -> dict[str, Any]:
        """One artifact's drift figures (also kept in the manifest as its ``drift`` entry). Its answers are cached
        in the workspace; the figures are recomputed from them every time (cheap), so they follow the measures."""
        ref = self.reference(on_reference)
        afp = fingerprint("drift", self.fp, entry.get("fingerprint"), entry.get("size"))
        out = self.ws.root / "eval" / f"drift-{afp}.json"
        if out.exists():  # written atomically under a name that holds its fingerprint
            data = json.loads(out.read_text(encoding="utf-8"))
        else:
            t0 = time.perf_counter()
            scorer = backend.scorer(self.ws.abs(key), n_ctx=self.n_ctx)
            try:
                many = getattr(scorer, "generate_many", None)
                model = getattr(scorer, "model", None)
                if not callable(many) and _is_hf(model):  # GPTQ: its transformers model, 8 prompts a batch
                    many = lambda ids, n, s: hf_greedy_many(model, ids, n, s)  # noqa: E731
                if callable(many):  # llama.cpp: many sequences per batch
                    outs = many(self.ids, self.settings.new_tokens, self.stop)
                    for _ in outs:
                        on_prompt and on_prompt()
                else:
                    outs = self._run(generator_for(scorer), on_prompt)
            finally:
                scorer.close()
            data = {"artifact": key, "seconds": round(time.perf_counter() - t0, 2),
                    "answers": _answers(self.tok, outs, self.stop)}
            write_json_atomic(out, data)
        answers = data["answers"]
        result = measures.summarize([p.text for p in self.prompts], ref, answers)
        result.update(prompt_set=self.spec, new_tokens=self.settings.new_tokens, seconds=data.get("seconds"),
                      bf16_seconds=self.ref_info.get("seconds"), bf16_dtype=self.ref_info.get("dtype"),
                      generated_tokens=sum(len(a["ids"]) for a in answers))
        return result
