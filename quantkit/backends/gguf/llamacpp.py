"""A thin, safe layer over llama.cpp's C API (through llama-cpp-python): load, tokenize, score.

Models are always loaded with ``use_extra_bufts = False``: on CPUs with AMX (Sapphire Rapids and newer) llama.cpp's
AMX repacking crashes on the first decode of quantized models (llama.cpp issue #20824), and the high-level
``Llama`` class ignores the setting. Without the extra buffer types the CPU path is plain ggml, which is correct
everywhere.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import MissingDependency, QuantkitError

_lock = threading.Lock()
_ready = False


def lib() -> Any:
    """The llama_cpp module, initialised once, with llama.cpp's own logging silenced unless QUANTKIT_DEBUG=1."""
    global _ready
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingDependency("GGUF needs llama-cpp-python", "pip install 'quantkit-ru[gguf]'") from exc
    with _lock:
        if not _ready:
            llama_cpp.llama_backend_init()
            from quantkit.backends.gguf import llamalog

            llamalog.install(llama_cpp)  # llama.cpp's log: quiet, remembered, shown with QUANTKIT_DEBUG=1
            _ready = True
    return llama_cpp


def gpu_offload() -> bool:
    return bool(lib().llama_supports_gpu_offload())


def default_threads() -> int:
    from quantkit.threads import threads

    return threads()  # --threads (QUANTKIT_THREADS), else every core


class LlamaModel:
    """A loaded GGUF model (weights only, or vocabulary only)."""

    def __init__(self, path: Path, *, vocab_only: bool = False, n_gpu_layers: int | None = None) -> None:
        L = self._L = lib()
        params = L.llama_model_default_params()
        params.use_extra_bufts = False
        params.vocab_only = vocab_only
        params.n_gpu_layers = (999 if gpu_offload() else 0) if n_gpu_layers is None else n_gpu_layers
        self.path = Path(path)
        if not self.path.exists():
            raise QuantkitError(f"{self.path} does not exist", "check the path")
        self.ptr = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            from quantkit.backends.gguf.llamalog import last_error

            said = last_error()
            raise QuantkitError(f"llama.cpp could not load {self.path.name}" + (f": {said}" if said else ""),
                                "the file is corrupt or not a GGUF model (QUANTKIT_DEBUG=1 shows llama.cpp's log)")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        L = lib()
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._L.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the C library may already be unloaded
            pass


class LlamaScorer:
    """Next-token logits for chunks of token ids, through a llama.cpp context (`Scorer` protocol)."""

    def __init__(self, path: Path, *, n_ctx: int = 512, threads: int = 0, flash_attn: bool = True) -> None:
        L = self._L = lib()
        self.name = Path(path).name
        self.model = LlamaModel(path)
        self.n_vocab = self.model.n_vocab
        self.n_ctx = n_ctx
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx
        cp.n_seq_max = 1
        n_threads = threads or default_threads()
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.flash_attn_type = 1 if flash_attn else 0
        cp.no_perf = True
        self.ctx_threads, self.flash_attn = n_threads, cp.flash_attn_type
        self.ctx = L.llama_init_from_model(self.model.ptr, cp)
        if not self.ctx:
            raise QuantkitError(f"llama.cpp could not create a context for {self.name}", "try a smaller --ctx")
        self.batch = L.llama_batch_init(n_ctx, 0, 1)

    def chunk_logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """float32 ``[len(tokens) - first, n_vocab]``, logits at positions ``first ..``; one decode per chunk."""
        L = lib()
        n = len(tokens)
        if n > self.n_ctx:
            raise ValueError("chunk longer than the context")
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        b = self.batch
        b.n_tokens = n
        for i, tok in enumerate(tokens.tolist()):
            b.token[i] = tok
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i >= first else 0
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise QuantkitError(f"llama.cpp failed to evaluate a chunk of {self.name} (code {rc})",
                                "QUANTKIT_DEBUG=1 shows llama.cpp's log")
        ptr = L.llama_get_logits_ith(self.ctx, first)
        return np.ctypeslib.as_array(ptr, shape=(n - first, self.n_vocab)).copy()

    def _decode(self, tokens: list[int], start: int) -> None:
        """Append `tokens` at positions ``start ..`` to sequence 0, logits for the last one only."""
        L = lib()
        b = self.batch
        b.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i == len(tokens) - 1 else 0
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise QuantkitError(f"llama.cpp failed to decode with {self.name} (code {rc})",
                                "QUANTKIT_DEBUG=1 shows llama.cpp's log")

    def generate(self, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
        """Greedy decoding with llama.cpp's KV cache: up to `max_new` tokens after `prompt`, the stop token included
        (argmax of the float32 logits, first index on ties, like torch)."""
        L = lib()
        if len(prompt) + max_new > self.n_ctx:
            raise ValueError(f"{len(prompt)} + {max_new} tokens do not fit the context of {self.n_ctx}")
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        self._decode(list(prompt), 0)
        out: list[int] = []
        while True:
            ptr = L.llama_get_logits_ith(self.ctx, -1)
            tok = int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())
            out.append(tok)
            if tok in stop or len(out) == max_new:
                return out
            self._decode([tok], len(prompt) + len(out) - 1)

    def generate_many(self, prompts: list[list[int]], max_new: int, stop: set[int], *, group: int = 32
                      ) -> list[list[int]]:
        """Greedy answers to many prompts, up to `group` sequences decoded together (one token of each per
        llama.cpp batch, each in its own KV cache): on a CPU the weights are read once per step for all of them.
        Same loop as `generate`; the batched matrix products may round differently on near-ties."""
        L = lib()
        out: list[list[int]] = []
        for start in range(0, len(prompts), group):
            part = prompts[start : start + group]
            seq_ctx = max(len(p) for p in part) + max_new
            cp = L.llama_context_default_params()
            cp.n_seq_max = len(part)
            cp.kv_unified = False
            cp.n_ctx = seq_ctx * len(part)
            cp.n_batch = cp.n_ubatch = max(seq_ctx, len(part))
            cp.n_threads = cp.n_threads_batch = self.ctx_threads
            cp.flash_attn_type = self.flash_attn
            cp.no_perf = True
            ctx = L.llama_init_from_model(self.model.ptr, cp)
            if not ctx:
                raise QuantkitError(f"llama.cpp could not create a context for {self.name}",
                                    "use fewer --drift-tokens or shorter prompts")
            batch = L.llama_batch_init(cp.n_batch, 0, 1)
            try:
                out += self._generate_group(ctx, batch, part, max_new, stop)
            finally:
                L.llama_batch_free(batch)
                L.llama_free(ctx)
        return out

    def _generate_group(self, ctx: Any, b: Any, prompts: list[list[int]], max_new: int, stop: set[int]
                        ) -> list[list[int]]:
        L = lib()

        def decode(items: list[tuple[int, int, int, bool]]) -> None:  # (token, pos, seq, logits)
            b.n_tokens = len(items)
            for i, (tok, pos, seq, want) in enumerate(items):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, 1 if want else 0
                b.seq_id[i][0] = seq
            rc = L.llama_decode(ctx, b)
            if rc != 0:
                raise QuantkitError(f"llama.cpp failed to decode with {self.name} (code {rc})",
                                    "QUANTKIT_DEBUG=1 shows llama.cpp's log")

        def argmax(i: int) -> int:
            return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)).argmax())

        outs: list[list[int]] = []
        for s, p in enumerate(prompts):
            decode([(t, i, s, i == len(p) - 1) for i, t in enumerate(p)])
            outs.append([argmax(len(p) - 1)])
        while True:
            live = [s for s, o in enumerate(outs) if o[-1] not in stop and len(o) < max_new]
            if not live:
                return outs
            decode([(outs[s][-1], len(prompts[s]) + len(outs[s]) - 1, s, True) for s in live])
            for i, s in enumerate(live):
                outs[s].append(argmax(i))

    def close(self) -> None:
        L = getattr(self, "_L", None)
        if L is not None and getattr(self, "ctx", None):
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.model.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the C library may already be unloaded
            pass
