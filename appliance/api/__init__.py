"""The Python API: the CLI's commands as functions over an unlocked vault, returning what `--json` prints.

    from appliance import api
    with api.open("/srv/appliance", passphrase) as v:
        api.vault_datasets(v)                    # == appliance vault datasets --json (less "ok", "schema")
        job = api.jobs_submit(v, "tiny-dense", overrides=["train.max_steps=100"])
        api.jobs_logs(v, job["id"])

Names follow the commands (`vault ingest` -> `vault_ingest`), arguments their options, results their JSON
shapes (documented in docs/API.md). The CLI and the MCP server call these same functions. Errors are
`ApplianceError`s with `.message` and `.hint`, as the CLI prints them. A check that finds problems
(`vault_check`, `audit_verify`, `eval_gate`, `eval_drift`, a flagged `quantize`) is not an error: its
report comes back with `"ok": false`, where the CLI would exit 1.

Long work (`train_run`, `quantize`, `eval_run`, `vault_ingest`) runs in the calling process; the `jobs_*`
functions queue the same work for a detached runner instead.

The functions live in one module per capability (ops, data, training, serving, evaluation, jobs, exchange,
agents: grants and an agent's calls, each checked against its grant)
and are all importable from here; `appliance.api` is the stable name. The command line, the console and the
MCP server import only this package (and `appliance.errors`): every rule the core keeps holds for all three.
"""

from __future__ import annotations

from appliance.api.agents import (  # noqa: F401
    agent_bundle_export,
    agent_deploy_compare,
    agent_deploy_list,
    agent_jobs_cancel,
    agent_jobs_eval,
    agent_jobs_list,
    agent_jobs_logs,
    agent_jobs_quantize,
    agent_jobs_submit,
    agent_jobs_sweep,
    agent_lineage,
    agent_open,
    agent_train_models,
    agent_train_runs,
    agent_vault_datasets,
    agent_vault_ingest,
    agent_vault_pii_review,
    agent_vault_records,
    agent_vault_show,
    agent_vault_sql,
    grant_check,
    grant_create,
    grant_list,
    grant_revoke,
)
from appliance.api.data import (  # noqa: F401
    audit_log,
    audit_verify,
    lineage,
    lineage_descendants,
    lineage_lines,
    record_origin,
    synth_check,
    synth_documents,
    synth_edge_cases,
    synth_tables,
    validate_dataset_name,
    vault_check,
    vault_datasets,
    vault_export,
    vault_ingest,
    vault_ingest_check,
    vault_passwd,
    vault_pii_review,
    vault_record,
    vault_records,
    vault_rekey,
    vault_rescrub,
    vault_seal,
    vault_show,
    vault_sql,
    vault_versions,
)
from appliance.api.deployments import (  # noqa: F401
    deploy_compare,
    deploy_create,
    deploy_delete_record,
    deploy_list,
    deploy_records,
    deploy_show,
    deploy_spec,
    eval_ab,
    eval_drift_served,
    feedback_add,
    feedback_export,
    serve_ab,
    serve_deployment,
)
from appliance.api.evaluation import (  # noqa: F401
    eval_compare,
    eval_drift,
    eval_gate,
    eval_plot,
    eval_run,
    eval_runs,
    eval_suite_check,
    eval_suites,
)
from appliance.api.exchange import (  # noqa: F401
    bundle_export,
    bundle_history,
    bundle_import,
    bundle_inspect,
    bundle_inspect_at,
    bundle_verify,
    keys_export_public,
    keys_export_public_at,
    keys_generate,
    keys_list,
    keys_list_at,
    model_export,
    trust_add,
    trust_list,
    trust_list_at,
    trust_remove,
    using_key_passphrase,
)
from appliance.api.jobs import (  # noqa: F401
    jobs_cancel,
    jobs_check,
    jobs_describe,
    jobs_eval,
    jobs_follow,
    jobs_list,
    jobs_logs,
    jobs_quantize,
    jobs_resume,
    jobs_show,
    jobs_submit,
    jobs_sweep,
    jobs_work,
)
from appliance.api.ops import (  # noqa: F401
    check_new_passphrase,
    doctor,
    get_passphrase,
    home,
    init,
    log_debug,
    log_event,
    log_setup,
    open,
    overview,
    protect_process,
    samples,
    schema,
    secret_from_env,
    vault_backup,
    vault_restore,
    version,
    wheelhouse_build,
)
from appliance.api.serving import (  # noqa: F401
    chat,
    generate,
    gguf_bundle,
    gguf_home,
    gguf_keys,
    gguf_locate,
    gguf_open,
    gguf_sealed,
    is_bundle,
    quantize,
    quantize_list,
    quantize_type,
    quantize_types,
    serve,
    serve_exposure,
)
from appliance.api.training import (  # noqa: F401
    train_import,
    train_merge,
    train_metrics,
    train_models,
    train_plot,
    train_recipe_notes,
    train_recipes,
    train_run,
    train_runs,
    train_tokenizer,
)
