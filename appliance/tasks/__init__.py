"""Agentic tasks: a model completes a goal with the site's own tools, in a bounded, logged loop.

The task format is shared by evaluation (a task's completion rate, `appliance.eval`) and training (GRPO on
a task, `appliance.train`); both import it from here and neither imports the other for it.

- `taskfile`: find, parse, validate (every problem as FILE:LINE: what) and build a `Task`;
- `sandbox`: one tool call in a separate, limited process with no secrets;
- `episode`: the model's turns, the tool calls and the success check;
- `shipped/`: the shipped task files (named without the `.toml`) and their tool modules.

A task file (TOML) declares:

    [task]
    name = "asset-risk"
    goal = "What is the risk class of asset {asset_id}?"   # filled from each episode's vars
    max_steps = 4                                          # model turns per episode
    tool_timeout = 5.0                                     # seconds per tool call

    [[tool]]
    name = "lookup_asset"
    function = "site_tools:lookup_asset"                   # module:function, imported in the sandbox
    description = "The register row of an asset."
    args = { asset_id = "str" }                            # str, int, float, bool

    [[episode]]
    vars = { asset_id = "RB-1000" }
    expect = "critical"
    split = "train"                                        # or "validation" (default train)

    [success]
    answer_contains = "{expect}"      # whole words, case-blind; or answer_regex (the whole answer); and/or
    tool_called = "lookup_asset"      # a successful call of this tool

Every call is kept with its arguments, outcome and time: in the eval run's cases, and counted in a
training run's summary.
"""

from appliance.tasks.episode import PROTOCOL, Episode, goal_of, judge, parse_call, prompt_for, run_episode
from appliance.tasks.sandbox import call_tool, sandbox_ids, sandbox_python
from appliance.tasks.taskfile import (
    SPLITS,
    TASKS_DIR,
    TYPES,
    Task,
    TaskFile,
    Tool,
    build,
    find,
    is_task_file,
    load,
    parse,
    shipped_names,
    validate,
)

__all__ = ["PROTOCOL", "SPLITS", "TASKS_DIR", "TYPES", "Episode", "Task", "TaskFile", "Tool", "build", "call_tool",
           "find", "goal_of", "is_task_file", "judge", "load", "parse", "parse_call", "prompt_for", "run_episode",
           "sandbox_ids", "sandbox_python", "shipped_names", "validate"]
