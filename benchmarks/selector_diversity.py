"""Selector vs beam search vs sampling on the offline question-generation task.

Trains a K=3 Selector (hard-EM focus selector + focus-aware copy seq2seq) and a plain copy
seq2seq of the same size on `offline_qg` (every source has 8 valid questions: 4 question
types with a skewed prior x 2 phrasings; 8 drawn per training source), then decodes K=3
outputs per test source:

    selector      one output per expert (thresholded focus, greedy decoding), top-1 by the
                  generator's likelihood (the paper's rule)
    selector_prior_rank   the same outputs, top-1 by the mixture's joint likelihood
                  pi_k p(y | x, focus_k), pi_k = the expert's share of training wins
    beam          the 3 best beams of a width-3 beam search
    topk / nucleus  3 samples (top-k=10 / top-p=0.9)

and reports top-1 BLEU and oracle BLEU (one reference per test source, drawn from the task's
distribution, as SQuAD has one), pairwise Self-BLEU, how many of the K outputs are valid and
distinct questions and how many question types they cover, and the examples each selector
expert won during training. Writes benchmarks/results/selector_diversity.{json,png}.

    PYTHONPATH=. python benchmarks/selector_diversity.py [--steps 1500] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch

from moe_scale.data.selector import Vocab, collate
from moe_scale.data.selector_sources import QUESTIONS, offline_qg
from moe_scale.models.selector import (
    GeneratorConfig, Generator, SelectorConfig, SelectorSeq2Seq, beam_generate, sample_generate,
)
from moe_scale.models.selector.metrics import diversity_report

RESULTS = Path(__file__).resolve().parent / "results"


def batches(examples, vocab, batch_size, rng):
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[j] for j in order[i : i + batch_size]], vocab)


def train(model, step_fn, examples, vocab, args, log_every, name):
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = random.Random(args.seed)
    model.train()
    history = []
    start = time.time()
    for step, batch in zip(range(1, args.steps + 1), batches(examples, vocab, args.batch_size, rng)):
        loss, extra = step_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        history.append(extra)
        if step % log_every == 0:
            print(f"[{name}] step {step}/{args.steps} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    return history, time.time() - start


def selector_step(model, batch):
    loss, stats = model(batch)
    return loss, stats.wins_K.tolist()


def baseline_step(model, batch):
    return model.loss(batch), None


def decode_all(decode, examples, vocab):
    """K output texts per example, and the selector expert behind each (-1 for the baselines)."""
    outputs, experts = [], []
    for i in range(0, len(examples), 100):
        batch = collate(examples[i : i + 100], vocab)
        gens = decode(batch)
        for b in range(gens.ids_BKL.shape[0]):
            outputs.append([" ".join(vocab.decode(ids, batch.oovs[b])) for ids in gens.ids_BKL[b]])
            experts.append(gens.expert_BK[b].tolist())
    return outputs, experts


def evaluate(decode, test, valid_sets, vocab, args):
    """K outputs per test example -> metrics (references: the one test question).

    valid_sets[group] maps each valid question of the source to its type.
    """
    outputs, experts = decode_all(decode, test, vocab)
    refs = [[" ".join(ex.target)] for ex in test]
    report = diversity_report(outputs, refs)
    kinds = [[valid_sets[ex.group].get(o, "invalid") for o in outs] for outs, ex in zip(outputs, test)]
    valid = [[o for o in outs if o in valid_sets[ex.group]] for outs, ex in zip(outputs, test)]
    report["valid_output_frac"] = sum(map(len, valid)) / (len(test) * args.k)
    report["distinct_valid_per_source"] = sum(len(set(v)) for v in valid) / len(test)
    report["question_types_per_source"] = sum(len(set(k) - {"invalid"}) for k in kinds) / len(test)
    report["top1_types"] = dict(Counter(k[0] for k in kinds))
    report["reference_types"] = dict(Counter(valid_sets[ex.group][r[0]] for ex, r in zip(test, refs)))
    if experts[0][0] >= 0:
        per_expert = {e: Counter() for e in range(args.k)}
        for kind_row, expert_row in zip(kinds, experts):
            for kind, e in zip(kind_row, expert_row):
                per_expert[e][kind] += 1
        report["types_per_expert"] = {str(e): dict(c) for e, c in per_expert.items()}
    report["examples"] = [{"source": " ".join(ex.source), "reference": r[0], "outputs": o}
                          for ex, r, o in list(zip(test, refs, outputs))[:5]]
    return report


def valid_questions(num_sources, seed):
    sets = {g: {} for g in range(num_sources)}
    per_source = 2 * len(QUESTIONS)
    for i, ex in enumerate(offline_qg(num_sources, seed=seed, targets_per_source=None)):
        sets[ex.group][" ".join(ex.target)] = list(QUESTIONS)[(i % per_source) // 2]
    return sets


def plot(results, win_curve, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.27
    for j, metric in enumerate(("top1_bleu", "oracle_bleu", "self_bleu")):
        xs = [i + (j - 1) * width for i in range(len(methods))]
        axes[0].bar(xs, [results["methods"][m][metric] for m in methods], width, label=metric)
    axes[0].set_xticks(range(len(methods)), [m.replace("_", "\n") for m in methods])
    axes[0].set_ylabel("BLEU-4")
    axes[0].set_title(f"K={results['k']} outputs per source (Self-BLEU: lower = more diverse)")
    axes[0].legend()
    steps = [s for s, _ in win_curve]
    for e in range(results["k"]):
        axes[1].plot(steps, [w[e] for _, w in win_curve], label=f"expert {e}")
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel(f"share of examples won (window of {results['win_window']} steps)")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("hard-EM assignments")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--train-sources", type=int, default=3000)
    p.add_argument("--test-sources", type=int, default=300)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dev-sources", type=int, default=200)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.15, 0.3, 0.5])
    p.add_argument("--cache", default="", help="directory to save trained models to / load them from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "selector_diversity"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    train_ex = offline_qg(args.train_sources, seed=args.seed, targets_per_source=8)
    test = offline_qg(args.test_sources, seed=args.seed + 1000, targets_per_source=1)
    valid_sets = valid_questions(args.test_sources, args.seed + 1000)
    dev = offline_qg(args.dev_sources, seed=args.seed + 2000, targets_per_source=1)
    dev_valid_sets = valid_questions(args.dev_sources, args.seed + 2000)
    # Words of fewer than 20 training pairs (names seen once or never) stay out: they are copied.
    vocab = Vocab.build([ex.source for ex in train_ex] + [ex.target for ex in train_ex], min_freq=20)
    oov_frac = sum(vocab.id(t) == 1 for ex in test for t in ex.source) / sum(len(ex.source) for ex in test)
    print(f"train pairs {len(train_ex)}, vocab {len(vocab)}, test sources {len(test)}, "
          f"OOV source tokens {oov_frac:.1%}")

    dims = dict(vocab_size=len(vocab), embed_dim=64, hidden_dim=args.hidden, answer_dim=0, dropout=0.1)
    torch.manual_seed(args.seed)
    selector = SelectorSeq2Seq(SelectorConfig(num_experts=args.k, expert_dim=64, **dims), GeneratorConfig(**dims))
    torch.manual_seed(args.seed)
    baseline = Generator(GeneratorConfig(use_focus=False, **dims))

    cache = Path(args.cache) if args.cache else None
    if cache and (cache / "models.pt").exists():
        saved = torch.load(cache / "models.pt")
        selector.load_state_dict(saved["selector"])
        baseline.load_state_dict(saved["baseline"])
        wins_history, sel_time, base_time = saved["wins_history"], saved["sel_time"], saved["base_time"]
        print(f"loaded trained models from {cache}")
    else:
        wins_history, sel_time = train(selector, selector_step, train_ex, vocab, args, 250, "selector")
        _, base_time = train(baseline, baseline_step, train_ex, vocab, args, 250, "baseline")
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(dict(selector=selector.state_dict(), baseline=baseline.state_dict(), wins_history=wins_history,
                            sel_time=sel_time, base_time=base_time), cache / "models.pt")
    selector.eval()
    baseline.eval()

    # The focus threshold is chosen on a dev split by oracle BLEU (the paper uses 0.15 for QG).
    dev_oracle = {}
    for t in args.thresholds:
        dev_report = evaluate(lambda b: selector.generate(b, threshold=t), dev, dev_valid_sets, vocab, args)
        dev_oracle[t] = dev_report["oracle_bleu"]
    threshold = max(dev_oracle, key=dev_oracle.get)
    print(f"dev oracle BLEU by focus threshold: {dev_oracle} -> {threshold}")

    rng = torch.Generator().manual_seed(args.seed)
    log_prior = torch.tensor([sum(w[e] for w in wins_history) for e in range(args.k)], dtype=torch.float)
    log_prior = (log_prior.clamp(min=1) / log_prior.clamp(min=1).sum()).log()
    decoders = {
        "selector": lambda b: selector.generate(b, threshold=threshold),
        "selector_prior_rank": lambda b: selector.generate(b, threshold=threshold, expert_log_prior=log_prior),
        "beam": lambda b: beam_generate(baseline, b, args.k),
        "topk_sampling": lambda b: sample_generate(baseline, b, args.k, top_k=10, rng=rng),
        "nucleus_sampling": lambda b: sample_generate(baseline, b, args.k, top_p=0.9, rng=rng),
    }
    methods = {}
    for name, decode in decoders.items():
        methods[name] = evaluate(decode, test, valid_sets, vocab, args)
        m = methods[name]
        print(f"{name:>19}: top-1 {m['top1_bleu']:5.1f}  oracle {m['oracle_bleu']:5.1f}"
              f"  self-BLEU {m['self_bleu']:5.1f}"
              f"  valid {m['valid_output_frac']:.2f}  distinct valid/source {m['distinct_valid_per_source']:.2f}"
              f"  types/source {m['question_types_per_source']:.2f}  top-1 types {m['top1_types']}")

    window = max(args.steps // 30, 1)
    win_curve = []
    for start in range(0, len(wins_history) - window + 1, window):
        chunk = wins_history[start : start + window]
        totals = [sum(w[e] for w in chunk) for e in range(args.k)]
        win_curve.append((start + window, [t / max(sum(totals), 1) for t in totals]))
    total_wins = [sum(w[e] for w in wins_history) for e in range(args.k)]
    last = wins_history[-window:]
    results = {
        "k": args.k, "args": vars(args), "vocab_size": len(vocab), "train_pairs": len(train_ex),
        "test_sources": len(test), "oov_source_token_frac": oov_frac,
        "focus_threshold": threshold, "dev_oracle_bleu_by_threshold": dev_oracle,
        "train_seconds": {"selector": sel_time, "baseline": base_time},
        "expert_wins_total": total_wins,
        "expert_wins_last_window": [sum(w[e] for w in last) for e in range(args.k)],
        "win_window": window, "expert_win_share_curve": win_curve, "methods": methods,
    }
    print(f"expert wins over training: {total_wins} (last {window} steps: {results['expert_wins_last_window']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, win_curve, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
