#!/usr/bin/env python3
"""Checks glatrain's Hugging Face export against `transformers` itself.

    scripts/check-hf-export.py [--glatrain BIN] [--text FILE] [--device cpu|cuda] [--tol REL]
                               RUN_OR_CHECKPOINT...

For each checkpoint (a run directory means its newest): `glatrain export` (fp32) into a temporary
directory; `from_pretrained` of the class its config.json names (transformers' own class; fla's
GLAForCausalLM for GLA, named explicitly because importing fla also registers fla's Mamba under
the Auto classes' "mamba"), which must report no missing, unexpected
or mismatched keys; `glatrain eval --text` on the text; and the same tokens, in the same windows
(the whole text as one stream, non-overlapping windows of data.seq_len predicted tokens, each from
a fresh state), through the transformers model. Prints both losses and their difference and exits
1 when a relative difference exceeds --tol.

Exits 0 with a skip message where torch or `transformers` is not installed. A GLA checkpoint needs
flash-linear-attention (`import fla`, which registers GLAForCausalLM; skipped with a message
without it). Its kernels are Triton, for CUDA only: on the CPU the model runs with fla's own
plain-torch references in their place (`naive_recurrent_gla` for the sequence mixing,
`rms_norm_ref` for the norms, the SwiGLU and the swish-gated norm written out), so the check covers
fla's model code, its config and the exported weights; on CUDA fla's kernels run as they are.

The text defaults to the first 8 KiB of the embedded corpus's validation split
(data/brown-valid.txt.gz). Its tokens come from the exported tokenizer through AutoTokenizer (the
count must equal glatrain's), or are the text's bytes for runs with the byte tokenizer.
"""

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--glatrain", default=os.path.join(ROOT, "target/release/glatrain"))
    p.add_argument("--text", help="a .txt or .jsonl file (default: 8 KiB of the Brown validation split)")
    p.add_argument("--text-field", default="text", help="the text field of a .jsonl --text file")
    p.add_argument("--device", help="where transformers runs: cpu or cuda (default: cuda when available)")
    p.add_argument("--tol", type=float, help="relative loss difference allowed (default: 1e-5 on cpu, 2e-3 on cuda)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    return p.parse_args()


def read_text(path, field):
    """The text glatrain evaluates: a .jsonl file's fields joined by blank lines, else the file."""
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if not path.endswith(".jsonl"):
        return content
    docs = [json.loads(line)[field] for line in content.splitlines() if line.strip()]
    return "\n\n".join(docs)


def glatrain(binary, *args):
    out = subprocess.run([binary, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"glatrain {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out.stdout


def windows(n_tokens, seq_len):
    """(start, predicted) of each window, as glatrain's eval --text cuts them."""
    predicted = max(n_tokens - 1, 0)
    return [(s, min(seq_len, predicted - s)) for s in range(0, predicted, seq_len)]


def hf_nats(model, tokens, seq_len, batch, device, torch):
    """Summed cross-entropy (nats, float64) of the transformers model over the windows."""
    import torch.nn.functional as F

    total = 0.0
    all_windows = windows(len(tokens), seq_len)
    full = [w for w in all_windows if w[1] == seq_len]
    tail = [w for w in all_windows if w[1] != seq_len]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[w] for w in tail]
    with torch.no_grad():
        for group in groups:
            n = group[0][1]
            x = torch.tensor([tokens[s:s + n] for s, _ in group], device=device)
            y = torch.tensor([tokens[s + 1:s + n + 1] for s, _ in group], device=device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            total += nats.double().sum().item()
    return total


def use_fla_references_on_cpu():
    """Swaps fla's Triton kernels in the GLA model for plain torch (fla's own references where it
    has them), so that the model runs on the CPU."""
    import torch.nn.functional as F
    import fla.layers.gla as gla_layer
    from fla.modules import FusedRMSNormGated, RMSNorm
    from fla.modules.mlp import SwiGLULinear
    from fla.modules.norm.layernorm import rms_norm_ref
    from fla.ops.gla.naive import naive_recurrent_gla

    def rms_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_ref(x, self.weight, self.bias, residual, self.eps, prenorm, upcast=True)

    def rms_norm_swish_gate(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        if residual is not None or prenorm or self.activation not in ("swish", "silu"):
            raise NotImplementedError("only the plain swish-gated norm has a CPU stand-in")
        return rms_norm_ref(x, self.weight, self.bias, None, self.eps, False, upcast=True) * F.silu(g)

    def swiglu_linear(self, x, y, weight, bias):
        return F.linear(F.silu(x) * y, weight, bias)

    def gla(q, k, v, g=None, initial_state=None, output_final_state=False, cu_seqlens=None, gk=None, **_):
        if cu_seqlens is not None:
            raise NotImplementedError("cu_seqlens has no CPU stand-in")
        return naive_recurrent_gla(q, k, v, g if g is not None else gk, initial_state, output_final_state)

    RMSNorm.forward = rms_norm
    FusedRMSNormGated.forward = rms_norm_swish_gate
    SwiGLULinear.forward = swiglu_linear
    gla_layer.chunk_gla = gla_layer.fused_chunk_gla = gla_layer.fused_recurrent_gla = gla


def main():
    args = parse_args()
    try:
        import torch
        import transformers
        from transformers import AutoTokenizer
    except ImportError as e:
        print(f"skipped: this check needs torch and transformers ({e}); pip install torch transformers safetensors")
        return 0
    try:
        from fla.models import GLAForCausalLM
        fla_error = None
    except ImportError as e:
        GLAForCausalLM, fla_error = None, str(e)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tol = args.tol if args.tol is not None else (1e-5 if device == "cpu" else 2e-3)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {device}, "
          f"relative tolerance {tol:g}")

    work = tempfile.mkdtemp(prefix="check-hf-export-")
    text_path = args.text
    if text_path is None:
        with gzip.open(os.path.join(ROOT, "data/brown-valid.txt.gz"), "rb") as f:
            sample = f.read(8192).decode("utf-8", errors="ignore")
        text_path = os.path.join(work, "brown-valid-8k.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            f.write(sample)
    text = read_text(text_path, args.text_field)

    failed = 0
    rows = []
    for i, checkpoint in enumerate(args.checkpoints):
        out = os.path.join(work, f"hf-{i}")
        glatrain(args.glatrain, "export", "--checkpoint", checkpoint, "--out", out)
        with open(os.path.join(out, "config.json")) as f:
            config = json.load(f)
        model_type = config["model_type"]
        if model_type == "gla" and fla_error:
            print(f"skipped {checkpoint} (GLA): flash-linear-attention is not importable ({fla_error})")
            continue
        if model_type == "gla" and device == "cpu":
            use_fla_references_on_cpu()
        report_path = os.path.join(work, f"eval-{i}.json")
        glatrain(args.glatrain, "eval", "--checkpoint", checkpoint, "--text", text_path,
                 "--text-field", args.text_field, "--json", report_path)
        with open(report_path) as f:
            report = json.load(f)

        if os.path.exists(os.path.join(out, "tokenizer.json")):
            # The exported tokenizer, as transformers loads it (glatrain adds no special tokens).
            tokenizer = AutoTokenizer.from_pretrained(out)
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            tokens = list(text.encode("utf-8"))
        if len(tokens) != report["tokens"]:
            print(f"FAILED {checkpoint}: {len(tokens)} tokens here, {report['tokens']} in glatrain eval")
            failed += 1
            continue

        model_class = GLAForCausalLM if model_type == "gla" else getattr(transformers, config["architectures"][0])
        model, info = model_class.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            print(f"FAILED {checkpoint}: from_pretrained reports {problems}")
            failed += 1
            continue
        model.to(device).eval()
        nats = hf_nats(model, tokens, report["seq_len"], args.batch, device, torch)
        hf_loss = nats / report["predicted"]
        diff = hf_loss - report["loss"]
        rel = abs(diff) / report["loss"]
        ok = rel <= tol and math.isfinite(hf_loss)
        failed += not ok
        rows.append((checkpoint, config["architectures"][0], report["predicted"], report["loss"], hf_loss, diff, rel, ok))

    print(f"{'checkpoint':<40} {'class':<18} {'tokens':>7} {'glatrain':>12} {'transformers':>12} "
          f"{'difference':>11} {'relative':>9}")
    for checkpoint, cls, n, ours, theirs, diff, rel, ok in rows:
        print(f"{checkpoint:<40} {cls:<18} {n:>7} {ours:>12.8f} {theirs:>12.8f} {diff:>11.2e} {rel:>9.2e}"
              f"{'' if ok else '  FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
