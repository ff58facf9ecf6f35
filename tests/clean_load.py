"""Load an exported Engram model where the `modeling_engram` package cannot be imported, and write its outputs.

    python -I tests/clean_load.py SPEC.json

`-I` keeps PYTHONPATH, the current directory and the script's directory off `sys.path`; a meta-path finder then hides
`modeling_engram` from every other finder (an editable install's finder, a regular install in site-packages), and the
script checks that importing it fails. Unpickling is made to fail too, so a load that unpickles anything fails.

SPEC is a JSON object: `source` (folder or Hub repo id), `out` (a .safetensors file for the outputs), `report` (a
JSON file: the classes' modules, modules imported from `package_dir`, the error of `broken_source`), optional
`tokenizer` (also load the tokenizer from `source`), `broken_source` (a folder that must fail to load),
`package_dir` (no module may be imported from it), `push_to` (a repo id: push the loaded model there again, which
takes transformers' own push_to_hub since the package's hub helper is absent). `outputs()` is also imported by the tests, to compute the
reference outputs with the package's own classes.
"""

import importlib.abc
import json
import sys

import torch

INPUT_IDS = [[5, 17, 42, 8, 66, 23, 9, 51, 30, 12, 77], [0, 0, 0, 0, 14, 3, 88, 41, 7, 19, 60]]
ATTENTION_MASK = [[1] * 11, [0] * 4 + [1] * 7]
PROMPTS = ["def main():", "x = 1"]
NEW_TOKENS = 8


def outputs(model, tokenizer=None) -> dict[str, torch.Tensor]:
    """Logits of a left-padded batch and greedy generations from it (and from tokenized prompts)."""
    input_ids, attention_mask = torch.tensor(INPUT_IDS), torch.tensor(ATTENTION_MASK)
    generate = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        result = {
            "logits": model(input_ids, attention_mask=attention_mask).logits,
            "generated": model.generate(input_ids, attention_mask=attention_mask, **generate),
        }
        if tokenizer is not None:
            tokenizer.padding_side = "left"
            batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
            result["prompt_ids"] = batch["input_ids"]
            result["prompt_generated"] = model.generate(**batch, **generate)
    return result


class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "modeling_engram":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: this is the clean environment)", name=name)
        return None


def forbid_unpickling() -> None:
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("loading tried to unpickle")

    def audit(event, args):
        if event == "pickle.find_class":
            raise AssertionError(f"loading tried to unpickle {args}")

    torch.load = pickle.load = pickle.loads = refuse
    sys.addaudithook(audit)


def main(spec: dict) -> None:
    sys.meta_path.insert(0, HidePackage())
    try:
        import modeling_engram  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError("modeling_engram is importable: this is not a clean environment")
    forbid_unpickling()

    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    report = {}
    if spec.get("broken_source"):
        try:
            AutoModelForCausalLM.from_pretrained(spec["broken_source"], trust_remote_code=True)
        except Exception as error:  # what fails is the point: it must fail
            report["broken_error"] = f"{type(error).__name__}: {error}"
        else:
            report["broken_error"] = None

    source = spec["source"]
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    # AutoTokenizer reads config.json too, whose auto_map makes it ask before running configuration_engram.py
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True) if spec.get("tokenizer") else None
    result = outputs(model, tokenizer)
    with torch.no_grad():
        result["base_hidden"] = base(torch.tensor(INPUT_IDS), attention_mask=torch.tensor(ATTENTION_MASK)).last_hidden_state
    save_file({k: v.contiguous() for k, v in result.items()}, spec["out"])

    if spec.get("push_to"):
        model.push_to_hub(spec["push_to"])

    package_dir = spec.get("package_dir")
    report.update(
        classes={type(x).__name__: type(x).__module__ for x in (config, model, base)},
        from_package_dir=sorted(
            name for name, module in list(sys.modules.items())
            if package_dir and str(getattr(module, "__file__", None) or "").startswith(package_dir)
        ),
    )
    with open(spec["report"], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        main(json.load(f))
