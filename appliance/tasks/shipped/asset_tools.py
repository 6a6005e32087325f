"""Tools of the shipped `asset-risk` task: a small asset register, looked up by name.

Run in the task sandbox (a separate process with no secrets); a site's own tools take the same shape:
plain functions with typed arguments that return JSON-able values or raise with a message.
"""

REGISTER = {
    "pump": "high", "valve": "low", "boiler": "high", "turbine": "medium", "crane": "medium",
    "tank": "low", "compressor": "high", "generator": "medium", "heater": "low", "conveyor": "medium",
    "furnace": "high", "mixer": "low",
}


def lookup(asset: str) -> dict:
    key = asset.strip().lower()
    if key not in REGISTER:
        raise KeyError(f"no asset named {asset!r}")
    return {"asset": key, "risk": REGISTER[key]}
