"""Models in service: deployments, the A/B server, sealed serving records, feedback, A/B comparison and
drift over what was served.

- `store`: the deployment rows, serving records and feedback in the vault (all SQL lives here);
- `recorder`: scrubs what was served and writes it into the vault in batches, attached only to write;
- `router`: which arm (model or candidate) answers a request, sticky per conversation or client;
- `server`: the OpenAI-compatible HTTP server over one or two GGUFs;
- `ab`: the comparison of the two arms on what they served, with intervals and a verdict;
- `drift`: a recent window of served inputs and outputs against the window before it;
- `feedback`: ratings and corrections, and the dataset version made from them.
"""
