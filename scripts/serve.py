"""Serve a checkpoint over HTTP with the OpenAI API, and a chat page at http://HOST:PORT/.

    python scripts/serve.py --checkpoint runs/quickstart
    python scripts/serve.py --checkpoint path/to/model.gguf --port 8080 --api-key secret

Any OpenAI client works unchanged:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="quickstart", messages=[{"role": "user", "content": "hi"}])

It binds to 127.0.0.1 unless --host says otherwise (0.0.0.0 exposes it to the network: set
--api-key then). Needs the `serve` extra (pip install 'llmstack[serve]').
"""
from llmstack.cli import add_device_argument, add_dtype_argument, script_parser
from llmstack.runtime import resolve_device, resolve_dtype, set_threads
from llmstack.serve.server import Limits, serve


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a run directory, checkpoint directory, Hugging Face "
                                                           "directory or GGUF file")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    parser.add_argument("--model-name", default=None, help="the model's id in the API (default: the checkpoint's name)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="KV blocks in the pool (default: max-running sequences of the whole context)")
    parser.add_argument("--max-running", type=int, default=64, help="sequences in the running batch at most")
    parser.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per forward pass (prefill budget)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--max-pending", type=int, default=256, help="queued + running choices before 429s")
    add_device_argument(parser)
    add_dtype_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    device = resolve_device(args.device)
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port}/ (OpenAI API under /v1)", flush=True)
    serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
          device=device, dtype=resolve_dtype(args.dtype, device), limits=Limits(max_pending=args.max_pending),
          block_size=args.block_size, n_blocks=args.kv_blocks, max_running=args.max_running,
          max_batch_tokens=args.max_batch_tokens, prefix_caching=not args.no_prefix_caching)


if __name__ == "__main__":
    main()
