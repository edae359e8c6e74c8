"""Reward functions beside reward models: verifiable rewards (a checker, a unit test, a format rule) written in
Python, as TRL's GRPOTrainer takes them in `reward_funcs`.

A function is named `path/to/file.py:function`. It is called with keyword arguments, as TRL calls its reward
functions: `prompts` (one per reply; a string, or a conversation), `completions` (the replies: strings for string
prompts, `[{"role": "assistant", "content": ...}]` for conversations) and every other column of the prompts' rows
(`reference`, say), one value per reply. It returns one number per reply. An entry of `reward_funcs` without `.py`
names another reward model, as in TRL. `generate_candidates.py` adds each scorer's rewards with `reward_weights`
(`reward_model` first, then `reward_funcs` in order; 1 each by default).

Whatever goes wrong on the user's side is one line that names the function: a missing file, an import error, no
such function, an exception it raises, a result that is not one finite number per reply.
"""

import importlib.util
import math
from pathlib import Path

from diversity_simpo.settings import ConfigError, first_line


def is_function(spec):
    """A reward_funcs entry that names a Python file's function; any other entry names a reward model."""
    return ".py" in str(spec)


def load(spec):
    """The function `spec` ("path/to/file.py:function") names, imported from its file."""
    path, _, name = str(spec).rpartition(":")
    if not path or not name or not path.endswith(".py"):
        raise ConfigError(f"reward_funcs entry {spec!r} must be path/to/file.py:function_name")
    if not Path(path).is_file():
        raise ConfigError(f"reward function {spec}: file {path} not found")
    module_name = f"reward_function_{abs(hash(str(Path(path).resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error while importing it is theirs
        raise ConfigError(
            f"reward function {spec}: importing {path} failed: {type(e).__name__}: {first_line(e)}"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(f"reward function {spec}: {path} defines no function {name!r} (it has {defined})")
    return function


def rewards(function, spec, prompts, completions, columns):
    """`function`'s reward of each completion, checked: one finite number per completion."""
    try:
        values = function(prompts=prompts, completions=completions, **columns)
    except Exception as e:  # the user's code
        raise ConfigError(f"reward function {spec} raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise ConfigError(
            f"reward function {spec} returned {got} for {len(completions)} completions: return a list of one "
            "number per completion"
        )
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(
                f"reward function {spec} returned {value!r} for completion {index}: each reward must be a finite number"
            )
    return [float(v) for v in values]


def as_completion(prompt, reply):
    """A reply as TRL hands it to a reward function: a string for a string prompt, else an assistant message list."""
    return reply if isinstance(prompt, str) else [{"role": "assistant", "content": reply}]
