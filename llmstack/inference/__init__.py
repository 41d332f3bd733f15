"""Generation, sampling, beam search, KV caches, quantization, speculative decoding and long context."""
from llmstack.inference.beam import Hypothesis, beam_search
from llmstack.inference.compiled import CompiledDecoder
from llmstack.inference.config import GenerationConfig
from llmstack.inference.generate import StopText, chat, generate, generate_text, stream_generate
from llmstack.inference.loading import from_pretrained
from llmstack.inference.long_context import extend_context, loss_by_position
from llmstack.inference.quantize import QuantizedLinear, load_quantized, quantize_, save_quantized
from llmstack.inference.sampling import SamplingParams, process_logits, sample, sample_next
from llmstack.inference.speculative import SpeculativeOutput, load_draft, lookup_continuation, speculative_generate

__all__ = [
    "CompiledDecoder", "GenerationConfig", "Hypothesis", "QuantizedLinear", "SamplingParams", "SpeculativeOutput", "StopText",
    "beam_search", "chat", "extend_context", "from_pretrained", "generate", "generate_text", "load_draft", "load_quantized",
    "lookup_continuation", "loss_by_position", "process_logits", "quantize_", "sample", "sample_next",
    "save_quantized", "speculative_generate", "stream_generate",
]
