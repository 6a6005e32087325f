"""The episode loop: a model's turns, its tool calls (run in the sandbox) and the task's success check.

Each turn the model either calls one tool, as a JSON object {"name": ..., "arguments": {...}} on its own,
or answers. A tool that raises, or a call with a wrong name or arguments, is an error the model sees, and
the episode goes on (it may call again). A tool that hangs past its timeout, or whose sandbox dies (out of
memory, a crash), ends the episode as failed with that reason. Evaluation plays episodes one at a time
(`run_episode`); GRPO training advances many `Episode`s side by side, a model turn at a time.
"""

from __future__ import annotations

import json
import re

from appliance.tasks.sandbox import call_tool
from appliance.tasks.taskfile import Task, fill_regex

RESULT_CHARS = 2000  # a tool's answer is cut to this many characters before the model sees it
PROTOCOL = 'Tools: to call one, reply with only {"name": TOOL, "arguments": {...}}; else answer in plain words.'


def parse_call(text: str) -> dict | None:
    """The tool call in a reply (its first JSON object with a "name"), or None for an answer."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            return obj
        start = text.find("{", start + 1)
    return None


def prompt_for(task: Task, goal: str, turns: list[tuple[str, str]]) -> str:
    tools = "\n".join(f"- {t.name}({', '.join(f'{a}: {ty}' for a, ty in t.args.items())}): {t.description}"
                      for t in task.tools.values())
    history = "".join(f"\nYou: {said}\nResult: {result}" for said, result in turns)
    return f"{PROTOCOL}\n{tools}\nTask: {goal}{history}"


def goal_of(task: Task, index: int) -> str:
    ep = task.episodes[index]
    return task.goal.format(**ep.get("vars", {}), expect=ep.get("expect", ""))


class Episode:
    """One episode, advanced a model turn at a time (training samples many side by side)."""

    def __init__(self, task: Task, index: int):
        self.task, self.index, self.goal = task, index, goal_of(task, index)
        self.turns: list[tuple[str, str]] = []
        self.calls: list[dict] = []
        self.answer: str | None = None
        self.reason: str | None = None
        self.done = False

    def prompt(self) -> str:
        return prompt_for(self.task, self.goal, self.turns)

    def step(self, reply: str, log=lambda line: None) -> None:
        """The model's reply: an answer ends the episode; a call runs and its result joins the history."""
        reply = reply.strip()
        call = parse_call(reply)
        if call is None:
            self.answer, self.done = reply, True
            return
        res = call_tool(self.task, call["name"], call.get("arguments", {}))
        self.calls.append({"tool": call["name"], "arguments": call.get("arguments"), **res})
        log(f"episode {self.index}: {call['name']}({json.dumps(call.get('arguments'), default=str)}) -> "
            + ("ok" if res["ok"] else f"error: {res['error']}") + f" in {res['seconds']} s")
        if res.get("fatal"):
            self.reason, self.done = res["error"], True
            return
        shown = json.dumps(res["result"], default=str) if res["ok"] else f"error: {res['error']}"
        self.turns.append((reply, shown[:RESULT_CHARS]))
        if len(self.turns) >= self.task.max_steps:
            self.reason, self.done = f"no answer within {self.task.max_steps} steps", True

    def fail(self, reason: str) -> None:
        self.reason, self.done = reason, True

    @property
    def success(self) -> bool:
        return self.done and self.reason is None and judge(self.task, self.index, self.answer, self.calls)[0]

    def result(self) -> dict:
        ok, why = judge(self.task, self.index, self.answer, self.calls) if self.reason is None else (False, self.reason)
        return {"episode": self.index, "goal": self.goal, "answer": self.answer, "calls": self.calls,
                "steps": len(self.turns) + (self.answer is not None), "success": ok, "reason": why}


def judge(task: Task, index: int, answer: str | None, calls: list[dict]) -> tuple[bool, str | None]:
    """The task's success check on a finished episode: (success, reason it failed).

    answer_contains matches whole words, case-blind ("low" is not in "below"); answer_regex must match the
    whole answer (stripped, case-blind), with the episode's values filled in literally.
    """
    ep = task.episodes[index]
    vars_, expect = ep.get("vars", {}), ep.get("expect", "")
    if answer is None:
        return False, "no answer"
    if want := task.success.get("answer_contains"):
        want = want.format(**vars_, expect=expect)
        if not re.search(rf"(?<!\w){re.escape(want)}(?!\w)", answer, re.IGNORECASE):
            return False, "the answer does not contain what the task expects"
    if pattern := task.success.get("answer_regex"):
        if not re.fullmatch(fill_regex(pattern, vars_, expect), answer.strip(), re.IGNORECASE | re.DOTALL):
            return False, "the answer does not match the task's answer_regex"
    if (tool := task.success.get("tool_called")) and not any(c["tool"] == tool and c["ok"] for c in calls):
        return False, f"{tool} was never called successfully"
    return True, None


def run_episode(task: Task, complete, index: int, log=lambda line: None) -> dict:
    """One episode: at most max_steps model turns; `complete(prompt) -> text` is the model."""
    ep = Episode(task, index)
    while not ep.done:
        try:
            reply = complete(ep.prompt())
        except Exception as e:  # noqa: BLE001 - e.g. the history outgrew the model's context: this episode fails
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            ep.fail(f"the model failed: {type(e).__name__}" + (f": {first}" if first else ""))
            break
        ep.step(reply, log)
    return ep.result()
