"""Real processes: a lost worker or node is replaced and the job grows back to full strength.

A warm spare (started ahead by its agent, waiting in splice.init()) takes a crashed
worker's place in the very next epoch; a node that joins after a node was lost is admitted
while the world is short. Newcomers get their state from a member's in-memory snapshot over
the epoch's process group. Every step's global loss must equal the uninterrupted run's, on
survivors and newcomers alike.
"""

from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path

import pytest

from splice.localjob import LocalJob
from tests.conftest import JOB_TIMEOUT_S, assert_losses_match, run_fault_job

pytestmark = pytest.mark.integration

STEPS = 40
# Survivors hold after this step until the newcomer's epoch is announced (a process that
# starts cold needs seconds to import torch; without the hold the job could end first).
HOLD = 12
HOLD_FLOOR_S = 120.0  # holding is not a hang


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    summary, records = run_fault_job(tmp_path_factory.mktemp("reference"), steps=STEPS)
    assert summary["phase"] == "complete", summary["logs"]
    curve = next(iter(records.values()))["losses"]
    assert sorted(curve) == list(range(STEPS))
    return curve


def test_a_warm_spare_replaces_a_crashed_worker(tmp_path: Path,
                                                reference: dict[int, float]) -> None:
    summary, records = run_fault_job(tmp_path, steps=STEPS, die=["node-1/0:15:during"],
                                     spares=1, replace=True)
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    # One recovery: the spare node-1/2 is in the lost worker's place in epoch 2 already.
    assert summary["epoch"] == 2, summary["timeline"]
    assert summary["members"] == ["node-0/0", "node-0/1", "node-1/1", "node-1/2"]
    new = records["node-1/2"]
    assert new["world_size"] == 4
    step = min(new["losses"])
    # The spare adopted the snapshots node-1/0 left in the agent's shared memory: no
    # transfer from a peer.
    assert new["restored_from"] == f"node-1/0 shared memory, step {step}", new
    assert 14 <= step <= 15  # the consistent step of the fault, nothing replayed twice
    assert sorted(new["losses"]) == list(range(step, STEPS))
    for wid in ("node-0/0", "node-0/1", "node-1/1"):
        assert records[wid]["pid"] == summary["pids"][wid]  # survivors never restarted
        assert sorted(records[wid]["losses"]) == list(range(STEPS))
    assert_losses_match(records, reference)
    resume = [t for k, e, t in summary["timeline"] if k == "resume"]
    assert resume and "node-1/2 holds it already" in resume[0], resume
    assert "sends node-1/2" not in resume[0]


def test_a_predecessors_corrupted_snapshots_are_refused_and_a_peer_sends_its_own(
        tmp_path: Path, reference: dict[int, float]) -> None:
    # node-1/0 damages its snapshots in shared memory, then dies in the same step: the
    # spare that adopts them finds them corrupt, offers none, and receives a survivor's.
    # The spare starts with the job; on a loaded machine it may still be importing torch
    # when the fault strikes: the survivors then train on at world 3 and hold at step
    # HOLD until it joins, instead of finishing without it.
    summary, records = run_fault_job(
        tmp_path, steps=STEPS, die=["node-1/0:12:before"], spares=1, replace=True,
        extra_args=("--corrupt-snapshots", "node-1/0:12", "--hold-at", f"{HOLD}:3:4"),
        hang_floor_s=HOLD_FLOOR_S)
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    assert "snapshot of step 12 is corrupt" in summary["logs"]
    assert "adopted the snapshots of steps [11, 12] that node-1/0 left" in summary["logs"]
    resume = [t for k, e, t in summary["timeline"] if k == "resume"]
    assert any(re.search(r"node-\d/[01] sends node-1/2 its snapshot", t) for t in resume), \
        resume
    new = records["node-1/2"]
    assert re.fullmatch(rf"node-\d/[01] memory, step {min(new['losses'])}",
                        new["restored_from"]), new
    assert_losses_match(records, reference)


def test_without_a_spare_a_fresh_process_replaces_the_worker(
        tmp_path: Path, reference: dict[int, float]) -> None:
    # No warm spare: the agent starts a new process, which joins once its hook is ready
    # (the survivors train on at world 3 meanwhile).
    summary, records = run_fault_job(tmp_path, steps=STEPS, die=["node-0/1:10:before"],
                                     replace=True, extra_args=("--hold-at", f"{HOLD}:3:4"),
                                     hang_floor_s=HOLD_FLOOR_S)
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    assert len(summary["members"]) == 4 and "node-0/2" in summary["members"]
    kinds = [(k, e) for k, e, _ in summary["timeline"] if k in ("epoch", "resume")]
    assert ("epoch", 3) in kinds, "shrink to 3 first, then grow back to 4"
    assert records["node-0/2"]["restored_from"].endswith(
        f"memory, step {min(records['node-0/2']['losses'])}")
    assert_losses_match(records, reference)


def test_a_new_node_joins_after_a_node_was_lost(tmp_path: Path,
                                                reference: dict[int, float]) -> None:
    added: list[str] = []

    def lose_then_add(job: LocalJob) -> None:
        job.kill_node(1)
        job.wait_until(lambda s: s.epoch >= 2, JOB_TIMEOUT_S, "the survivors' epoch")
        added.append(job.add_node())

    summary, records = run_fault_job(tmp_path, steps=STEPS, at_step=8, action=lose_then_add,
                                     extra_args=("--hold-at", f"{HOLD}:3:4"),
                                     hang_floor_s=HOLD_FLOOR_S)
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    assert added == ["node-2"]
    assert sorted(summary["members"]) == ["node-0/0", "node-0/1", "node-2/0", "node-2/1"]
    for wid in ("node-2/0", "node-2/1"):
        rec = records[wid]
        assert rec["world_size"] == 4
        assert rec["restored_from"].startswith("node-0/"), rec
        # ... fetched from node-0's agent, which serves it out of shared memory.
        assert re.search(rf"worker {wid}: fetched [0-9.]+ MB of step-\d+ state from "
                         r"node-0/\d's agent", summary["logs"]), summary["logs"]
        assert sorted(rec["losses"]) == list(range(min(rec["losses"]), STEPS))
    for wid in ("node-0/0", "node-0/1"):
        assert sorted(records[wid]["losses"]) == list(range(STEPS))
    assert_losses_match(records, reference)


def test_spares_are_stopped_when_the_job_completes(tmp_path: Path) -> None:
    # Nothing fails: the spare never joins, and the agents still exit (0) at the end.
    summary, records = run_fault_job(tmp_path, steps=10, spares=1, replace=True)
    assert summary["phase"] == "complete", summary["logs"]
    assert len(records) == 4 and summary["epoch"] == 1
    assert "spare node-0/2 is warm" in summary["logs"] or "warm spare node-0/2" in \
        summary["logs"]
    assert "node-0/2" not in summary["members"]
    # (run_fault_job waits for every agent to exit: a spare left waiting would hang it)


def test_a_corrupted_snapshot_is_caught_and_a_peer_replica_used(
        tmp_path: Path, reference: dict[int, float]) -> None:
    # node-1/1's snapshots are damaged in memory; when node-0/1 dies in the same step, the
    # checksums catch the damage, node-1/1 offers no snapshot, and node-0/0 sends it one.
    summary, records = run_fault_job(tmp_path, steps=STEPS, die=["node-0/1:12:before"],
                                     extra_args=("--corrupt-snapshots", "node-1/1:12"))
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    assert "snapshot of step 12 is corrupt" in summary["logs"]
    resume = [t for k, e, t in summary["timeline"] if k == "resume"]
    assert resume and "node-0/0 sends node-1/1 its snapshot" in resume[0], resume
    rec = records["node-1/1"]
    assert rec["pid"] == summary["pids"]["node-1/1"]  # the same process, repaired in place
    assert rec["restored_from"] == "node-0/0 memory, step 12"
    assert sorted(rec["losses"]) == list(range(STEPS))
    assert_losses_match(records, reference)


def test_sharded_optimizer_state_survives_n_to_n_minus_1_to_n(
        tmp_path: Path, zero_reference: dict[int, float]) -> None:
    # ZeRO-1: each rank holds a quarter of the AdamW moments, plus a replica of the
    # previous rank's. node-0/1 dies: its shard is rebuilt from node-1/0's replica while
    # the 3 survivors reshard; then a fresh process joins and the 4-rank layout returns.
    summary, records = run_fault_job(
        tmp_path, steps=STEPS, die=["node-0/1:10:during"], replace=True,
        extra_args=("--zero", "--hold-at", f"{HOLD}:3:4"), hang_floor_s=HOLD_FLOOR_S)
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    worlds = [t for k, e, t in summary["timeline"] if k == "epoch"]
    assert "world 3" in worlds[1] and "world 4" in worlds[2], worlds
    assert "node-0/2" in summary["members"] and len(records) == 4
    assert "from the 4-rank layout" in summary["logs"]
    assert "from the 3-rank layout" in summary["logs"]
    for wid, rec in records.items():
        for step, loss in rec["losses"].items():
            assert math.isclose(loss, zero_reference[step], rel_tol=1e-6, abs_tol=1e-9), (
                f"{wid} step {step}: {loss} != reference {zero_reference[step]}")


def test_sharded_optimizer_state_survives_losing_a_whole_node(
        tmp_path: Path, zero_reference: dict[int, float]) -> None:
    # Replicas are placed on the other node, so the 2 ranks of the lost node leave no gap.
    summary, records = run_fault_job(tmp_path, steps=STEPS, lose_node_at_step=10,
                                     extra_args=("--zero",))
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    assert sorted(summary["members"]) == ["node-0/0", "node-0/1"]
    assert "from the 4-rank layout" in summary["logs"]
    for wid, rec in records.items():
        assert sorted(rec["losses"]) == list(range(STEPS))
        for step, loss in rec["losses"].items():
            assert math.isclose(loss, zero_reference[step], rel_tol=1e-6, abs_tol=1e-9), (
                f"{wid} step {step}: {loss} != reference {zero_reference[step]}")


def test_replicas_go_to_another_node() -> None:
    from splice.agent.worker.state_sources import replica_shift

    assert replica_shift(["a/0", "a/1", "b/0", "b/1"]) == 2
    assert replica_shift(["a/0", "b/0", "a/1", "b/1"]) == 1
    assert replica_shift(["a/0", "a/1", "a/2"]) == 1  # one node: the best there is
    assert replica_shift(["a/0", "a/1", "a/2", "b/0"]) == 1  # no shift crosses for all
    members = ["a/0", "a/1", "a/2", "b/0", "b/1", "c/0"]
    s = replica_shift(members)
    assert all(members[r][0] != members[(r + s) % 6][0] for r in range(6)), s


def test_a_corruption_culprits_spare_gets_a_healthy_members_snapshot(
        tmp_path: Path, reference: dict[int, float]) -> None:
    # A bit flips in node-1/0's weights; the fingerprint check kills it. Its snapshots were
    # taken from the corrupted state (their checksums match it), so the spare taking its
    # place must not adopt them: it receives a healthy member's instead.
    summary, records = run_fault_job(
        tmp_path, steps=STEPS, spares=1, replace=True,
        extra_args=("--sdc-every", "1", "--bitflip", "node-1/0:12"))
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    sdc = [v for v in summary["verdicts"] if v[0] == "sdc"]
    assert sdc and sdc[0][1:] == ("bitflip", "node-1/0", "kill"), summary["verdicts"]
    assert "not handing node-1/0's snapshots to node-1/2" in summary["logs"]
    new = records["node-1/2"]
    assert re.fullmatch(r"node-\d/\d memory, step \d+", new["restored_from"]), new
    assert not new["restored_from"].startswith("node-1/0")
    assert_losses_match(records, reference)


def test_under_mutual_tls_a_spare_fetches_a_peers_snapshot_over_tls(
        tmp_path: Path, reference: dict[int, float]) -> None:
    # Certificates everywhere (controller, agents, and the agents' snapshot servers): the
    # spare whose adopted snapshots are corrupt fetches node-0/0's from node-0's agent.
    summary, records = run_fault_job(
        tmp_path, steps=STEPS, die=["node-1/0:12:before"], spares=1, replace=True,
        extra_args=("--corrupt-snapshots", "node-1/0:12"), tls_dir=str(tmp_path / "tls"))
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    assert re.search(r"worker node-1/2: fetched [0-9.]+ MB of step-\d+ state from "
                     r"node-0/\d's agent", summary["logs"]), summary["logs"]
    assert records["node-1/2"]["restored_from"].startswith("node-0/")
    assert "cannot serve snapshots" not in summary["logs"]
    assert_losses_match(records, reference)


def test_sharded_optimizer_under_ddp_survives_a_crash(
        tmp_path: Path, zero_reference: dict[int, float]) -> None:
    # ZeRO-1 with the model in DistributedDataParallel: DDP's buckets are reduced through
    # the resilient group, the sharded optimizer steps on the reduced gradients, and a
    # lost rank's shard is rebuilt from its replica as without DDP.
    summary, records = run_fault_job(tmp_path, steps=STEPS, die=["node-0/1:10:during"],
                                     ddp=True, extra_args=("--zero",))
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    assert len(summary["members"]) == 3
    assert "from the 4-rank layout" in summary["logs"]
    for wid, rec in records.items():
        assert sorted(rec["losses"]) == list(range(STEPS))
        for step, loss in rec["losses"].items():
            # DDP reduces float32 buckets: equal up to float32 summation order.
            assert math.isclose(loss, zero_reference[step], rel_tol=1e-3), (
                f"{wid} step {step}: {loss} != reference {zero_reference[step]}")


def test_a_shard_lost_with_its_in_step_replica_comes_from_an_agents_replica(
        tmp_path: Path, zero_reference: dict[int, float]) -> None:
    # 3 nodes of one rank each: rank r's shard is replicated in step on rank r + 1 only,
    # so losing nodes 1 and 2 at once leaves rank 1's shard in no member's memory. But
    # node-0's agent (--replicas 2) holds replicas of both lost workers' snapshots.
    def lose_two_nodes(job: LocalJob) -> None:
        for agent in job.agents[1:]:
            os.killpg(agent.pid, signal.SIGKILL)

    summary, records = run_fault_job(
        tmp_path, steps=STEPS, nodes=3, nproc=1, at_step=12, action=lose_two_nodes,
        replicas=2, replicate_interval_s=0.05, step_sleep_s=0.2, extra_args=("--zero",))
    assert summary["phase"] == "complete", summary["message"] + summary["logs"]
    assert summary["members"] == ["node-0/0"]
    assert "FALLBACK TO DISK" not in summary["logs"]
    assert re.search(r"optimizer shard of old rank 1 \(node-1/0\) from an agent's replica "
                     r"of step \d+", summary["logs"]), summary["logs"]
    (rec,) = records.values()
    assert sorted(rec["losses"]) == list(range(STEPS))
    assert_losses_match(records, zero_reference)
