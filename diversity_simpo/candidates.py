"""On-policy candidates: N replies per prompt sampled from the model to be tuned, each scored by a reward model, and
written in princeton-nlp's layout (`prompt`, `all_generated_responses`, `all_rm_scores`), which training reads as is
(`pair_selection: best_vs_worst` is the SimPO authors' recipe, `divpo` DivPO's). generate_candidates.py runs it.

Prompts. `data.load_prompts` reads them from any layout training reads and renders them as training will: each is
tokenised as TRL's CPO trainer tokenises a prompt (its chat-template step, then BOS once), so a sampled reply
continues exactly the context it will be trained in. The prompt is written in its normalised form (system turn and
all), so training applies nothing twice.

Sampling. One `generate` call per batch of prompts (`num_return_sequences=N`, KV cache on). The random draw for
reply j of prompt p at generated position t is a counter-based uniform u = H(seed, p, j, t) in [0, 1) (the first 56
bits of a sha256), not the next number of a global generator; the token is the inverse CDF at u of the sampling
distribution, softmax(logits / temperature) cut to its top-p nucleus (transformers' own TopPLogitsWarper), summed in
float64 (`CountedSampler`). A reply so depends on its prompt, its index and the seed only, not on the batch, the
shard or the rank that samples it: the output is the same for any batch size and any number of ranks, up to the
floating-point rounding of the logits in batches of another shape (the same shapes give the same bits).

Scoring. Every (prompt, reply) as a conversation in the reward model's own chat template; the reward is a
sequence-classification model's single logit, or the `score` output of models with their own code (ArmoRM,
`trust_remote_code: true`).

Output. `output_dir/train-00000-of-0000K.jsonl`: shards of `shard_size` prompts in the prompts' order, the i-th shard
still to write (every shard, in a new run) sampled by rank i mod world_size, each written whole (a temporary file
renamed into place), and `candidates.yaml`, the settings that decide the output and the prompts' fingerprint.
Started again with the same settings, a run samples only the shards that are missing, so a run killed at any moment
loses at most the shards it was writing, and no prompt is written twice. Training refuses a folder with a shard
missing (data._check_candidates_complete). Each
sampled row also holds `all_mean_logps`, each reply's mean token log-probability under the model that sampled it
(tokenised as training tokenises a pair: the rarity DivPO's rules read, so training needs no pass of its own when it
starts from that model), and `all_cut`: for each reply, whether it reached max_new_tokens before its end of turn.
Training appends the end-of-turn token to every reply it trains, so a cut reply would be taught as a finished answer:
it is never chosen (unless `allow_cut_replies`), and may still be rejected.
"""

import hashlib
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from diversity_simpo import candidate_folder, reward_functions
from diversity_simpo.data import load_prompts
from diversity_simpo.rows import as_chat, is_conversation
from diversity_simpo.settings import ConfigError, check_model_location, check_writable, first_line, json_mapping


@dataclass
class CandidateArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The model to sample from (the one training will start from): Hub id or folder."},
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "Reward model that scores each reply: a sequence-classification model, Hub id or folder."},
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More scorers beside (or instead of) reward_model, as TRL's GRPOTrainer takes reward_funcs: "
            "reward models (Hub id or folder), and functions, path/to/file.py:function, called with prompts=, "
            "completions= and the prompts' other columns, returning one number per completion "
            "(diversity_simpo/reward_functions.py)."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Weight of each scorer in the score: reward_model first, then reward_funcs, then the implicit "
            "reward (default: 1 each)."
        },
    )
    implicit_reward_reference: str | None = field(
        default=None,
        metadata={
            "help": "A scorer without a reward model, DICE's implicit reward in SimPO's form: each sampled reply's "
            "mean token log-probability under model_name_or_path (a model preference-trained from this one, e.g. "
            "by plain SimPO on your pairs) less that under this model (Hub id or folder; the same tokenizer)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a Hub dataset id or a local .jsonl(.gz)/.json/.parquet/.csv file or folder, in any "
            "layout training reads, or a prompt (or instruction) column alone."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    dataset_split: str = field(default="train", metadata={"help": "Split whose prompts are sampled; shards carry it."})
    dataset_columns: dict | str | None = field(
        default=None, metadata={"help": "Rename columns to the layout's names, as in training (e.g. {prompt: input})."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System turn given to every prompt that has none: use training's value."}
    )
    wrap_text_as_chat: bool = field(
        default=False, metadata={"help": "Plain-text prompts as one user turn in the chat template: training's value."}
    )
    max_prompts: int = field(default=0, metadata={"help": "Sample the first N prompts only (0: all)."})
    prompt_slice: str = field(
        default="1/1",
        metadata={
            "help": "Sample slice i of k equal slices of the prompts (after max_prompts): 2/3 is the second third "
            "(on-policy rounds on fresh prompts; 1/1: all)."
        },
    )
    num_candidates: int = field(default=5, metadata={"help": "Replies sampled per prompt (at least 2)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling: the smallest top set with this mass."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Longest reply, in tokens (longer ones are cut)."})
    seed: int = field(default=42, metadata={"help": "With the prompt and the reply's index, decides every draw."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call (each with num_candidates)."})
    cache_implementation: str = field(
        default="dynamic",
        metadata={
            "help": "generate's KV cache: dynamic, or static (preallocated; on a GPU transformers compiles the "
            "forward for it). Both give the same replies; benchmarks/bench_candidates.py measures their speed."
        },
    )
    score_batch_size: int = field(default=16, metadata={"help": "Replies per reward-model forward pass."})
    shard_size: int = field(default=256, metadata={"help": "Prompts per output file: the unit a killed run redoes."})
    output_dir: str = field(default="output/candidates", metadata={"help": "Folder of the shards; train on it."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete candidates already in output_dir and start again."}
    )
    dtype: str = field(default="auto", metadata={"help": "Weights' dtype: auto (the checkpoint's), bfloat16, float32."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even where a GPU exists."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models with their own code (ArmoRM's reward model needs it)."}
    )
    local_rank: int = field(
        default=-1, metadata={"help": "Passed by the deepspeed launcher; the ranks come from the environment."}
    )

    def __post_init__(self):
        self.dataset_columns = json_mapping("dataset_columns", self.dataset_columns)
        if isinstance(self.reward_funcs, str):  # one scorer given as a string in the YAML: a list of one
            self.reward_funcs = [self.reward_funcs]
        prompt_slice(self.prompt_slice)  # checked now: a mistake is one line before anything runs


def prompt_slice(value):
    """(i, k) of an `i/k` slice setting, checked."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(
            f"prompt_slice={value!r} must be i/k with 1 <= i <= k, e.g. 2/3 (the second third of the prompts)"
        )
    return int(match[1]), int(match[2])


def sliced(prompts, i, k):
    """Slice i of k of `prompts`: [floor((i-1)n/k), floor(in/k)), so the k slices cover every prompt once."""
    return prompts[(i - 1) * len(prompts) // k : i * len(prompts) // k]


# The settings that decide what is written (not batch sizes): a run resumes only over the same ones
DECIDING = ("model_name_or_path", "reward_model", "reward_funcs", "reward_weights", "dataset_name", "dataset_config",
            "dataset_split", "dataset_columns", "system_prompt", "wrap_text_as_chat", "max_prompts", "prompt_slice",
            "num_candidates", "temperature", "top_p", "max_new_tokens", "seed", "shard_size", "dtype",
            "implicit_reward_reference")  # fmt: skip


# --- sampling --------------------------------------------------------------------------------------------------------


def prompt_token_ids(tokenizer, prompt):
    """A prompt's token ids as TRL's CPO trainer makes them: its chat-template step (maybe_apply_chat_template), the
    text tokenised without special tokens, and BOS prepended unless it is there (add_bos_token_if_needed)."""
    from trl.data_utils import maybe_apply_chat_template

    text = maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def reply_key(seed, prompt, index):
    """What decides reply `index` of `prompt`'s draws: the seed, the prompt (as JSON) and the index."""
    return hashlib.sha256(json.dumps([seed, prompt, index], ensure_ascii=False).encode()).digest()


def uniform(key, step):
    """u in [0, 1) for draw `step` of the reply with `key`: 56 bits of sha256(key, step), exact in float64."""
    return int.from_bytes(hashlib.sha256(key + step.to_bytes(8, "big")).digest()[:7], "big") / 2**56


class CountedSampler:
    """A logits processor that samples: each row's token is the inverse CDF of softmax(scores / temperature), cut to
    the top-p nucleus, at that row's counted uniform (module docstring). It returns scores that are 0 at that token
    and -inf elsewhere, so generate's own draw (with temperature 1 and no top-k or top-p of its own) can only pick it.
    `keys[r]` is row r's reply_key; `width` the padded prompt length, so that the step is the position generated."""

    def __init__(self, keys, width, temperature, top_p):
        from transformers import TopPLogitsWarper

        self.keys, self.width, self.temperature = keys, width, temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1 else None

    def __call__(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.width
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)
        draws = torch.tensor([uniform(key, step) for key in self.keys], dtype=torch.float64, device=scores.device)
        # the first token whose cumulative mass exceeds u: never one of probability 0 (its cdf equals its predecessor's)
        tokens = torch.searchsorted(cdf, (draws * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens, 0.0)


def sample(model, tokenizer, prompts, args, **generate_options):
    """(replies per prompt, tokens generated, per prompt whether each reply was cut at max_new_tokens, before its end
    of turn) for `prompts`, in one generate call (`generate_options`: more of generate's settings, as
    benchmarks/bench_candidates.py compares them)."""
    import torch

    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(ids):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, width - len(sequence) :] = 1
    n = args.num_candidates
    keys = [reply_key(args.seed, p, j) for p in prompts for j in range(n)]  # generate repeats each prompt n times
    sampler = CountedSampler(keys, width, args.temperature, args.top_p)
    with torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=n,
            max_new_tokens=args.max_new_tokens,
            logits_processor=[sampler],
            use_cache=True,
            cache_implementation=None if args.cache_implementation == "dynamic" else args.cache_implementation,
            **generate_options,
        )
    stops = set(_ids(model.generation_config.eos_token_id))
    replies, tokens, cut = [], 0, []
    for row in sequences[:, width:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), None)
        cut.append(end is None)
        reply = row if end is None else row[:end]
        tokens += len(reply) + (end is not None)
        replies.append(tokenizer.decode(reply, skip_special_tokens=True))
    per_prompt = range(len(prompts))
    return [replies[i * n : (i + 1) * n] for i in per_prompt], tokens, [cut[i * n : (i + 1) * n] for i in per_prompt]


def _ids(value):
    return [] if value is None else [value] if isinstance(value, int) else list(value)


# --- scoring ---------------------------------------------------------------------------------------------------------


def conversation(prompt, reply):
    """The whole conversation a reward model judges: the prompt's turns (a text prompt as one user turn), the reply."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*turns, {"role": "assistant", "content": reply}]


def score(reward_model, tokenizer, conversations, batch_size):
    """The reward of each conversation: the reward model's `score` output if it has one (ArmoRM), else its one logit;
    in batches of `batch_size`, right-padded with the model's own pad token (`config.pad_token_id`), in float32. A
    reward model finds where to read its score from that token (transformers: the last token that is not padding;
    ArmoRM: the one before the first pad), so one without a pad token is not given one (with the end-of-turn token
    as pad, it would read one token early): it scores each conversation alone, unpadded, as it was made to."""
    import torch

    ids = [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in conversations]
    pad = getattr(reward_model.config, "pad_token_id", None)
    if pad is None:
        batch_size = 1
    rewards = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.full((len(chunk), width), pad if pad is not None else 0, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(chunk):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        with torch.no_grad():
            output = reward_model(input_ids=input_ids.to(reward_model.device),
                                  attention_mask=attention_mask.to(reward_model.device))  # fmt: skip
        value = getattr(output, "score", None)
        if value is None:
            value = output.logits
        rewards += value.float().reshape(len(chunk), -1)[:, 0].tolist()
    return rewards


# --- loading and checking (nothing written) --------------------------------------------------------------------------


def load_tokenizer(name, trust_remote_code, what):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load the tokenizer of {what} {name}: {first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(args, device, dtype, tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(  # straight to this rank's device: no copy in host memory
            args.model_name_or_path, dtype=dtype, trust_remote_code=args.trust_remote_code, device_map={"": device}
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load the model {args.model_name_or_path}: {first_line(e)}") from None
    stops = _ids(model.generation_config.eos_token_id) or _ids(model.config.eos_token_id)
    stops = list(dict.fromkeys([*stops, *_ids(tokenizer.eos_token_id)]))  # TRL ends every trained reply with it
    # Exactly the settings here: the checkpoint's own generation_config.json (a repetition penalty, say) is not used,
    # and its end-of-turn tokens are kept (Llama-3 instruct models stop at <|eot_id|> and <|end_of_text|>)
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    return model.to(device).eval()


def load_reward_model(args, device, dtype, name):
    """The reward model `name` and its tokenizer, refused in one line if it could not score: no classification head in
    the checkpoint (a causal LM loaded this way would get a random one), no chat template, or more than one score."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, dtype=dtype, trust_remote_code=args.trust_remote_code, output_loading_info=True,
            device_map={"": device},
        )  # fmt: skip
    except Exception as e:  # transformers' OSError, ValueError, KeyError; a model's own code: anything (ImportError)
        if not args.trust_remote_code and not isinstance(e, (OSError, ValueError, KeyError)):
            raise
        code = " (its own code, trust_remote_code)" if args.trust_remote_code else ""
        raise ConfigError(
            f"reward_model {name} cannot be loaded as a sequence-classification model{code}: {type(e).__name__}: "
            f"{first_line(e)}"
        ) from None
    if info["missing_keys"]:  # e.g. score.weight: transformers initialised it at random
        heads = ", ".join(sorted(info["missing_keys"])[:3])
        raise ConfigError(
            f"reward_model {name} has no trained classification head ({heads} not in its checkpoint; it is "
            f"{', '.join(model.config.architectures or ['a model'])}): give a reward model (a sequence-classification "
            "model with one score, e.g. Skywork/Skywork-Reward-Llama-3.1-8B-v0.2)"
        )
    tokenizer = load_tokenizer(name, args.trust_remote_code, "reward_model")
    if tokenizer.chat_template is None:
        raise ConfigError(f"reward_model {name} has no chat template: it cannot be given the conversation to score")
    model = model.to(device).eval()
    if getattr(model.config, "pad_token_id", None) is None:
        print(f"warning: reward_model {name} has no pad_token_id in its config: scoring one reply per pass (set it "
              "to its tokenizer's pad token to batch)", file=sys.stderr)  # fmt: skip
    probe = tokenizer.apply_chat_template(conversation("?", "!"), return_dict=True, return_tensors="pt")
    with torch.no_grad():  # the output's shape, known before anything is written
        output = model(**probe.to(device))
    if getattr(output, "score", None) is None and output.logits.shape[-1] != 1:
        raise ConfigError(
            f"reward_model {name} outputs {output.logits.shape[-1]} logits, not one score: give a reward model with "
            "one label (or with a `score` output, as ArmoRM's)"
        )
    return model, tokenizer


def check_templates(prompts, tokenizer, reward_tokenizers, args):
    """Every prompt through the model's chat template (when it samples), and one prompt of each shape of conversation
    (which roles, in which order) through the reward model's, before anything is written: a template that refuses a
    system turn, say, is one line here, not a traceback after the first shard."""
    shapes = {}
    for index, prompt in enumerate(prompts):
        shape = "text" if isinstance(prompt["prompt"], str) else tuple(m["role"] for m in prompt["prompt"])
        shapes.setdefault(shape, index)
        try:
            if tokenizer is not None:  # the policy's template, when it samples
                prompt_token_ids(tokenizer, prompt["prompt"])
        except Exception as e:  # jinja2's TemplateError (a template's raise_exception), and whatever a template does
            raise ConfigError(
                f"the chat template of {args.model_name_or_path} rejects prompt {index}: {first_line(e)}"
            ) from None
    for (name, reward_tokenizer), (shape, index) in itertools.product(reward_tokenizers, shapes.items()):
        try:
            reward_tokenizer.apply_chat_template(conversation(prompts[index]["prompt"], "?"), tokenize=True)
        except Exception as e:
            raise ConfigError(
                f"the chat template of reward_model {name} rejects prompt {index} with its reply "
                f"(turns {shape}): {first_line(e)}"
            ) from None


def check_locations(args, sampling=True):
    """The settings that name things: both models (the policy only when sampling), output_dir; one line each,
    nothing written."""
    if not args.reward_model and not args.reward_funcs and not args.implicit_reward_reference:
        raise ConfigError("nothing scores the replies: set reward_model, reward_funcs or implicit_reward_reference")
    scorers = scorer_names(args)
    if args.reward_weights is not None and len(args.reward_weights) != len(scorers):
        raise ConfigError(
            f"reward_weights has {len(args.reward_weights)} weights for {len(scorers)} scorers ({', '.join(scorers)}): "
            "give one per scorer, reward_model first"
        )
    for setting in ("model_name_or_path", "reward_model") if sampling else ("reward_model",):
        if setting == "model_name_or_path" or args.reward_model:
            check_model_location(getattr(args, setting), setting)
    for spec in args.reward_funcs:
        if not reward_functions.is_function(spec):
            check_model_location(spec, "reward_funcs")
    if args.implicit_reward_reference:
        if not sampling:
            raise ConfigError(
                "implicit_reward_reference scores the replies that model_name_or_path samples, and these rows hold "
                "replies already: score them with reward_model or reward_funcs"
            )
        check_model_location(args.implicit_reward_reference, "implicit_reward_reference")
    if args.num_candidates < 2:
        raise ConfigError(f"num_candidates={args.num_candidates}: a pair needs at least 2 replies per prompt")
    check_writable(Path(args.output_dir))


def scorer_names(args):
    """The scorers in the order reward_weights weighs them: reward_model, reward_funcs, the implicit reward."""
    implicit = [f"implicit reward against {args.implicit_reward_reference}"] * bool(args.implicit_reward_reference)
    return [args.reward_model] * bool(args.reward_model) + list(args.reward_funcs) + implicit


# --- the run ---------------------------------------------------------------------------------------------------------


def generate_candidates(args):
    """Sample, score and write the candidates of `args` (CandidateArguments), on this process's share of the
    shards; every check is made before the first file is written. Rows that hold replies already (princeton-nlp's
    layout without scores) are scored as they are, nothing sampled."""
    import datetime

    import torch
    from accelerate import PartialState

    counts = {}
    prompts = load_prompts(args, args.dataset_split, counts)
    sampling = "replies" not in prompts[0]
    check_locations(args, sampling)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    prompts = sliced(prompts, *prompt_slice(args.prompt_slice))
    if not prompts:
        raise ConfigError(
            f"prompt_slice={args.prompt_slice} of {counts['prompts']} prompts holds none: use fewer slices"
        )
    manifest = candidate_folder.manifest_for({k: getattr(args, k) for k in DECIDING}, prompts, args.shard_size)
    todo = candidate_folder.shards_to_write(args.output_dir, manifest, args.overwrite)
    output = Path(args.output_dir)
    # the ranks meet only at the start and the end; a long run must not time out waiting at the end
    state = PartialState(cpu=args.use_cpu, timeout=datetime.timedelta(days=7))
    say = print if state.is_main_process else (lambda *a, **k: None)
    if not todo:
        say(f"{output}: all {len(prompts)} prompts already have candidates; nothing to do (--overwrite true samples "
            "again)")  # fmt: skip
        return
    tokenizer = policy = None
    if sampling:
        tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code, "model_name_or_path")
        if any(is_conversation(p["prompt"]) for p in prompts) and tokenizer.chat_template is None:
            raise ConfigError(
                f"the prompts are conversations but the tokenizer of {args.model_name_or_path} has no chat template; "
                "give an instruct model, or plain-text prompts (wrap_text_as_chat: false, no system_prompt)"
            )
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    scorers = []  # (name, a reward model and its tokenizer, a reward function, or {reference: the implicit reward's})
    for spec in [args.reward_model] * bool(args.reward_model) + list(args.reward_funcs):
        if spec is not args.reward_model and reward_functions.is_function(spec):
            function = reward_functions.load(spec)  # one call on the first prompt: a wrong return is one line now
            reward_functions.rewards(function, spec, *function_arguments(prompts[:1], [["?"]]))
            scorers.append((spec, function))
        else:
            scorers.append((spec, load_reward_model(args, state.device, dtype, spec)))
    check_templates(prompts, tokenizer, [(name, s[1]) for name, s in scorers if isinstance(s, tuple)], args)
    if sampling:
        policy = load_policy(args, state.device, dtype, tokenizer)
    if args.implicit_reward_reference:  # scored by the same tokenisation as the policy's log-probabilities
        reference = replace(args, model_name_or_path=args.implicit_reward_reference)
        scorers.append((scorer_names(args)[-1], {"reference": load_policy(reference, state.device, dtype, tokenizer)}))
    weights = args.reward_weights or [1.0] * len(scorers)

    if state.is_main_process:  # the first write: everything above checked out
        candidate_folder.start_folder(output, manifest, args.overwrite)
        done = len(manifest["shards"]) - len(todo)
        if done:
            say(f"{output}: {done} of {len(manifest['shards'])} shards already written; sampling the other {len(todo)}")
    state.wait_for_everyone()

    mine = todo[state.process_index :: state.num_processes]  # the shards still to write, spread evenly
    progress = _progress(sum(len(_shard(prompts, k, args.shard_size)) for k in mine), state)
    started, tokens, cut, scoring, scored = time.perf_counter(), 0, 0, 0.0, 0
    for k in mine:
        rows = []
        shard = _shard(prompts, k, args.shard_size)
        for start in range(0, len(shard), args.batch_size):
            batch = shard[start : start + args.batch_size]
            if sampling:
                replies, n_tokens, cut_replies = sample(policy, tokenizer, [p["prompt"] for p in batch], args)
                tokens, cut = tokens + n_tokens, cut + sum(map(sum, cut_replies))
            else:
                replies, cut_replies = [p["replies"] for p in batch], None
            conversations = [conversation(p["prompt"], r) for p, rs in zip(batch, replies, strict=True) for r in rs]
            rarity = mean_logps(policy, tokenizer, batch, replies, state.device) if sampling else None
            scoring -= time.perf_counter()
            each = [
                score(*scorer, conversations, args.score_batch_size)
                if isinstance(scorer, tuple)
                else implicit_reward(rarity, mean_logps(scorer["reference"], tokenizer, batch, replies, state.device))
                if isinstance(scorer, dict)
                else reward_functions.rewards(scorer, name, *function_arguments(batch, replies))
                for name, scorer in scorers
            ]
            scores = iter(
                sum(w * s for w, s in zip(weights, per_reply, strict=True)) for per_reply in zip(*each, strict=True)
            )
            scoring, scored = scoring + time.perf_counter(), scored + len(conversations)
            for index, (p, rs) in enumerate(zip(batch, replies, strict=True)):
                row = {k: v for k, v in p.items() if k != "replies"}
                row |= {"all_generated_responses": rs, "all_rm_scores": [next(scores) for _ in rs]}
                if sampling:
                    row |= {"all_cut": cut_replies[index], "all_mean_logps": rarity[index]}
                rows.append(row)
            elapsed = time.perf_counter() - started
            progress.update(len(batch))
            progress.set_postfix_str(f"{tokens / elapsed:.0f} tokens/s" if sampling else f"{len(rows)} rows scored")
        candidate_folder.write_shard(output, manifest, k, rows)
    progress.close()
    seconds = time.perf_counter() - started
    if mine:  # this rank's speed: each rank samples and scores on its own
        sampled = seconds - scoring
        speed = f"{tokens:,} tokens sampled in {sampled:.1f} s ({tokens / max(sampled, 1e-9):,.0f} tokens/s); "
        print(f"rank {state.process_index}: {speed if sampling else ''}{scored:,} replies scored in {scoring:.1f} s "
              f"({scored / max(scoring, 1e-9):,.0f} replies/s)", file=sys.stderr)  # fmt: skip
    if state.num_processes > 1:
        print(f"rank {state.process_index}: sampled {len(mine)} of the {len(todo)} shards to write", file=sys.stderr)
    if cut:
        print(f"rank {state.process_index}: {cut} replies reached max_new_tokens={args.max_new_tokens} before their "
              "end and are cut there (marked in all_cut: training never chooses them)", file=sys.stderr)  # fmt: skip
    state.wait_for_everyone()
    what = (
        f"{len(prompts)} prompts x {args.num_candidates} scored replies"
        if sampling
        else f"the replies of {len(prompts)} rows, scored"
    )
    say(f"Wrote {what} to {output} (train on it: dataset_name: {output})")


def mean_logps(policy, tokenizer, batch, replies, device):
    """Each reply's mean token log-probability under the model that sampled it, tokenised as training tokenises a
    pair (diversity_simpo/rarity.py), in one padded forward for the batch: what DivPO's rarity reads, stored so that
    training chooses its pairs without a pass of its own."""
    from diversity_simpo.rarity import candidate_logps

    rows = [{"prompt": p["prompt"], "candidates": rs} for p, rs in zip(batch, replies, strict=True)]
    rows = [row if isinstance(row["prompt"], str) else as_chat(row) for row in rows]  # replies as training has them
    return candidate_logps(policy, tokenizer, rows, device, rows_per_forward=len(rows), shared=False)


def implicit_reward(policy_logps, reference_logps):
    """Each reply's mean token log-probability under the policy less that under the reference, one per reply in
    row order: DICE's implicit reward (Chen et al., ICLR 2025) as SimPO's reward reads it (length-normalised, no
    beta: a positive scale leaves every pair rule's choice as it is)."""
    return [p - r for ps, rs in zip(policy_logps, reference_logps, strict=True) for p, r in zip(ps, rs, strict=True)]


def function_arguments(batch, replies):
    """(prompts, completions, other columns) for reward functions: one entry per reply, in TRL's form."""
    prompts = [p["prompt"] for p, rs in zip(batch, replies, strict=True) for _ in rs]
    completions = [
        reward_functions.as_completion(p["prompt"], r) for p, rs in zip(batch, replies, strict=True) for r in rs
    ]
    names = [k for k in batch[0] if k not in ("prompt", "replies")]
    columns = {k: [p.get(k) for p, rs in zip(batch, replies, strict=True) for _ in rs] for k in names}
    return prompts, completions, columns


def _shard(prompts, k, size):
    return prompts[k * size : (k + 1) * size]


def _progress(total, state):
    from tqdm.auto import tqdm

    desc = "sampling" if state.num_processes == 1 else f"rank 0 of {state.num_processes}: sampling"
    return tqdm(total=total, desc=desc, unit="prompt", disable=not state.is_main_process, file=sys.stderr)
