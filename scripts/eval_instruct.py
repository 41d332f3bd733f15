"""Held-out instructions, base against fine-tuned: answer loss, parse rate, exact match, ROUGE-L.

    python scripts/eval_instruct.py --checkpoint runs/quickstart runs/quickstart-lora
    python scripts/eval_instruct.py --checkpoint runs/quickstart runs/quickstart-lora --limit 50 --json out.json

Each model answers the validation split of the fine-tuning job's conversations (read from the last
checkpoint's job config; --data and --val-fraction choose others) greedily, with its own tokenizer
and chat template. Reported per model (llmstack.finetune.evaluate): the loss on the reference
answers' tokens, the share of answers that parse as Python, exact matches and ROUGE-L F1, and
one sample answer.
"""
import json
import sys
from pathlib import Path

import llmstack
from llmstack.cli import add_device_argument, positive_int, script_parser
from llmstack.data import DataError
from llmstack.data.chat import load_conversations
from llmstack.finetune.evaluate import evaluate_instructions
from llmstack.finetune.job import chat_tokenizer, load_job_config
from llmstack.runtime import resolve_device, set_threads


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", nargs="+", required=True, help="models to compare (run, checkpoint, HF, GGUF)")
    parser.add_argument("--data", help="conversations: stdlib or JSONL (default: the last checkpoint's job's)")
    parser.add_argument("--val-fraction", type=float, help="the held-out share (default: the job's, else 0.02)")
    parser.add_argument("--limit", type=positive_int, default=100, help="held-out conversations (default 100)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--json", help="write the results here")
    add_device_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    for path in args.checkpoint:
        if not Path(path).exists():
            sys.exit(f"error: --checkpoint {path!r} does not exist")
    try:
        job = load_job_config(args.checkpoint[-1])
    except Exception:  # a pretraining run, a Hugging Face directory: no fine-tuning job
        job = None
    source = args.data or (job.data.source if job else "stdlib")
    val_fraction = args.val_fraction or (job.data.val_fraction if job else 0.02)
    template = job.data.chat_template if job else None
    device = resolve_device(args.device)
    try:
        chats = load_conversations(source, "val", val_fraction=val_fraction,
                                   max_chars=job.data.max_chars if job else 1200)[:args.limit]
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"{len(chats)} held-out conversations from {source!r} on {device}, greedy, up to {args.max_new_tokens} "
          "new tokens")
    results = {}
    for path in args.checkpoint:
        try:
            tok = chat_tokenizer(path, template)
            model = llmstack.from_pretrained(path, device=device)
            results[path] = evaluate_instructions(model, tok, chats, max_new_tokens=args.max_new_tokens,
                                                  batch_size=args.batch_size)
        except (ValueError, FileNotFoundError, DataError) as e:
            sys.exit(f"error: {path}: {e}")
    width = max(len(p) for p in results)
    print(f"\n{'model':<{width}}  answer loss  parses  exact  ROUGE-L")
    for path, r in results.items():
        print(f"{path:<{width}}  {r['answer_loss']:11.3f}  {r['parse_rate']:6.1%}  {r['exact_match']:5.1%}  "
              f"{r['rouge_l']:7.3f}")
    for path, r in results.items():
        s = r["samples"][0]
        print(f"\n--- {path}: {s['instruction'].splitlines()[0]}\n{s['answer'][:400]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": source, "val_fraction": val_fraction, "models": results},
                                              indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
