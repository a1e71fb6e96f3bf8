"""Usage snippets shared by the formats that transformers and vLLM load (GPTQ, AWQ, FP8): the same Russian prompt
(or completion, for a base model) in each card."""

from __future__ import annotations

from quantkit.backends.base import COMPLETION, PROMPT


def transformers_generate(instruct: bool) -> str:
    """The lines after ``tokenizer`` and ``model`` are loaded: generate and print the answer."""
    if instruct:
        return (
            f'messages = [{{"role": "user", "content": "{PROMPT}"}}]\n'
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
            "                                       return_dict=True).to(model.device)\n"
            "out = model.generate(**inputs, max_new_tokens=256)\n"
            "print(tokenizer.decode(out[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"
        )
    return (
        f'inputs = tokenizer("{COMPLETION}", return_tensors="pt").to(model.device)\n'
        "out = model.generate(**inputs, max_new_tokens=128)\n"
        "print(tokenizer.decode(out[0], skip_special_tokens=True))"
    )


def vllm_generate(repo: str, instruct: bool, rev: str = "") -> str:
    """vLLM's offline API; `rev` is ``, revision="<branch>"`` for a variant on a branch."""
    head = f'from vllm import LLM, SamplingParams\n\nllm = LLM(model="{repo}"{rev})\n'
    if instruct:
        return head + (f'out = llm.chat([{{"role": "user", "content": "{PROMPT}"}}], SamplingParams(max_tokens=256))\n'
                       "print(out[0].outputs[0].text)")
    return head + (f'out = llm.generate(["{COMPLETION}"], SamplingParams(max_tokens=128))\n'
                   "print(out[0].outputs[0].text)")
