"""Several nodes: HSDP's mesh (replicate across nodes, shard within one) and a rendezvous id per run."""

from pathlib import Path

from appliance.train import loop
from appliance.train.config import load_recipe
from appliance.train.launch import Nodes, rendezvous_id
from appliance.train.spec import StageSpec


def test_fsdp_shards_within_a_node_and_replicates_across_nodes():
    assert loop.mesh_shape(8, 1) == (8,)  # one node: shard over all 8
    assert loop.mesh_shape(16, 2) == (2, 8)  # two nodes: 2 replicas of an 8-way shard (HSDP)
    assert loop.mesh_shape(32, 4) == (4, 8)
    assert loop.mesh_shape(2, 2) == (2,)  # one process a node: nothing to shard within it
    assert loop.Dist(0, 16, 0, "cuda:0", nnodes=2).shard_size == 8
    assert loop.Dist(0, 8, 0, "cuda:0").shard_size == 8 and loop.Dist().shard_size == 1


def _spec(run_id: str, recipe) -> StageSpec:
    p = Path("/nowhere")
    return StageSpec(run_id=run_id, recipe=recipe, rows=10, val_rows=0, tokenizer_path=p, base_path=None,
                     run_dir=p, model_dir=p, info={}, resume_from=None)


def test_the_rendezvous_id_is_one_per_run_and_the_same_on_every_node():
    recipe = load_recipe("dense-7b", ["data.datasets=site@2", "data.tokenizer=site-bpe@1"])
    nodes = Nodes(2, 0, "10.0.0.1:29400")
    first = rendezvous_id(_spec("dense-7b@1", recipe), nodes)
    assert first == rendezvous_id(_spec("dense-7b@1", recipe), Nodes(2, 1, "10.0.0.1:29400"))  # node 1 meets node 0
    assert first != rendezvous_id(_spec("dense-7b@2", recipe), nodes)  # the next run of the recipe does not
    assert first != rendezvous_id(_spec("dense-7b@1", recipe), Nodes(4, 0, "10.0.0.1:29400"))
    other = load_recipe("dense-7b", ["data.datasets=site@3", "data.tokenizer=site-bpe@1"])
    assert first != rendezvous_id(_spec("dense-7b@1", other), nodes)
    assert first.startswith("dense-7b-") and first != recipe.name
