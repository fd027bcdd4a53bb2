"""What the project's greedy decoding is, said to an OpenAI-compatible engine (vLLM, KServe's
Hugging Face runtime): every setting that changes which token is picked, at its "no effect"
value, as ``decode.NEUTRAL`` sets them for HF generate. An engine fills unset values from the
model's generation_config (Qwen's ships top_k 20 and a repetition penalty), so they are sent
explicitly with every request."""

from __future__ import annotations

GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
              frequency_penalty=0.0)
