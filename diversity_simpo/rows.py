"""The row vocabulary every module shares: what a conversation is, how text rows become chat rows, what counts as an
empty reply or a score. Nothing here reads files or loads models."""

import math


def is_conversation(value):
    """A list of {"role", "content"} turns."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def as_chat(row, system=None):
    """A text row as a conversation: its prompt string as one user turn (a conversation prompt stays), each reply
    (chosen, rejected, every candidate) as an assistant message, and `system` as the first turn if given."""
    chat = {
        **row,
        "prompt": [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"],
    }
    for key in ("chosen", "rejected"):
        if key in row:
            chat[key] = [{"role": "assistant", "content": row[key]}]
    if "candidates" in row:
        chat["candidates"] = [[{"role": "assistant", "content": reply}] for reply in row["candidates"]]
    return with_system(chat, system)


def with_system(pair, system):
    """The pair with `system` as its prompt's first turn, unless the prompt has a system turn already."""
    if system and pair["prompt"][0]["role"] != "system":
        pair["prompt"] = [{"role": "system", "content": system}, *pair["prompt"]]
    return pair


def one_kind(rows):
    """One split, one kind: TRL applies the chat template to all rows or to none, so string rows join chat rows."""
    if len({isinstance(r["prompt"], str) for r in rows}) > 1:
        rows = [as_chat(r) if isinstance(r["prompt"], str) else r for r in rows]
    return rows


def reply_text(reply):
    """A reply's text: a string, or the content of a reply message (or of a conversation's last turn)."""
    if isinstance(reply, dict):
        reply = [reply]
    if isinstance(reply, list) and reply and isinstance(reply[-1], dict):
        reply = reply[-1].get("content", reply[-1].get("value"))
    return reply


def empty_reply(reply):
    """A sampled reply with no text (the model ended its turn at once): common in on-policy candidates."""
    text = reply_text(reply)
    return isinstance(text, str) and not text.strip()


def is_score(value):
    """A finite number (not a boolean): what a candidate's score must be to be compared."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
