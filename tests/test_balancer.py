"""deploy/nginx: a real nginx in front of two real replicas (tests/balancer.py).

Which replica served a call is read from nginx's access log (its upstream address) and checked
against each replica's own metrics, so a wrong log format cannot fake the answer.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter, defaultdict

import numpy as np
import pytest
from balancer import NGINX, TEMPLATE, Cluster, render
from gateway_harness import make_pki, small_repository

from gateway.client import HegateClient
from gateway.client.protocol import KEY_ID_HEADER

MODEL = "breast-cancer-linear-eps3"  # keys in well under a second: many key sets are cheap
ENCRYPTED_OK = re.compile(rf'^hegate_requests_total\{{model="{MODEL}",path="encrypted",status="OK"\}} (\S+)$', re.M)
COLD_LOADS = re.compile(r"^hegate_key_cold_load_seconds_count (\S+)$", re.M)
PLAINTEXT_OK = re.compile(rf'^hegate_requests_total\{{model="{MODEL}",path="plaintext",status="OK"\}} (\S+)$', re.M)


def _count(pattern: re.Pattern, metrics: str) -> int:
    match = pattern.search(metrics)
    return int(float(match[1])) if match else 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("balancer")
    cluster = Cluster(root, small_repository(root / "repository")).start()
    yield cluster
    assert all(code in (0, None) for code in cluster.stop())


def test_the_template_hashes_on_the_sdks_header_and_passes_nginx_t(tmp_path):
    template = TEMPLATE.read_text()
    header = "$http_" + KEY_ID_HEADER.replace("-", "_")
    assert f"map {header} $hegate_balance_key" in template and "hash $hegate_balance_key consistent;" in template
    for tls in (None, make_pki(tmp_path / "pki")):
        root = tmp_path / ("tls" if tls else "h2c")
        (root / "temp").mkdir(parents=True)
        config = render(
            template,
            grpc_servers=["127.0.0.1:1", "127.0.0.1:2"],
            fast_path_servers=["127.0.0.1:3", "127.0.0.1:4"],
            grpc_listen="127.0.0.1:1",
            fast_path_listen="127.0.0.1:2",
            root=root,
            tls=(tls / "server.crt", tls / "server.key") if tls else None,
        )
        (root / "nginx.conf").write_text(config)
        result = subprocess.run(
            [NGINX, "-t", "-p", str(root), "-c", str(root / "nginx.conf")], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr


def test_every_call_of_a_key_set_lands_on_the_replica_that_holds_it(cluster):
    """Key sets until both replicas hold some (at most 16): each key id's upload and calls all
    reached one replica, which its metrics confirm, and no session had to register again."""
    x = np.random.default_rng(0).normal(size=(2, 30)).astype(np.float32)
    before = [_count(ENCRYPTED_OK, r.metrics()) for r in cluster.replicas]
    logged = cluster.balancer.served()
    start, deleted = len(logged), sum(c.method == "DeleteKeys" for c in logged)
    sessions = []
    with HegateClient(cluster.target) as client:
        while len(sessions) < 16:
            session = client.encrypted_session(MODEL)
            sessions.append(session)
            for _ in range(3):
                session.predict(x)
            holders = {cluster.index_of(cluster.balancer.upstream_of(s.key_id)) for s in sessions}
            if len(sessions) >= 4 and len(holders) == 2:
                break
        assert all(s.registrations == 1 for s in sessions)
        keyed = defaultdict(set)
        infers = Counter()
        infers_before = sum(c.method == "Infer" for c in logged)
        for call in cluster.balancer.served(method="Infer", count=infers_before + 3 * len(sessions))[start:]:
            if call.method in ("RegisterKeys", "Infer"):
                keyed[call.key_id].add(call.upstreams[-1])
                assert call.grpc_status == "0" and len(call.upstreams) == 1
            if call.method == "Infer":
                infers[cluster.index_of(call.upstreams[-1])] += 1
        assert set(keyed) == {s.key_id for s in sessions}
        assert all(len(upstreams) == 1 for upstreams in keyed.values()), keyed
        assert len({next(iter(u)) for u in keyed.values()}) == 2  # both replicas hold key sets
        after = [_count(ENCRYPTED_OK, r.metrics()) for r in cluster.replicas]
        assert [a - b for a, b in zip(after, before, strict=True)] == [infers[0], infers[1]]
        for session in sessions:
            session.close()
    logged = cluster.balancer.served(method="DeleteKeys", count=deleted + len(sessions))[start:]
    deletes = [c for c in logged if c.method == "DeleteKeys"]
    assert all(next(iter(keyed[c.key_id])) == c.upstreams[-1] for c in deletes) and len(deletes) == len(sessions)


@pytest.mark.parametrize("port", ["grpc", "fast path"])
def test_plaintext_calls_go_round_robin(cluster, port):
    x = np.random.default_rng(1).normal(size=(1, 30)).astype(np.float32)
    fast = cluster.fast_path_target if port == "fast path" else None
    before = [_count(PLAINTEXT_OK, r.metrics()) for r in cluster.replicas]
    with HegateClient(cluster.target, fast_path_target=fast) as client:
        client.list_models()
        logged = cluster.balancer.served()
        seen, seen_infers = len(logged), sum(c.method == "ModelInfer" for c in logged)
        for _ in range(10):
            client.predict(MODEL, x)
    calls = [
        c
        for c in cluster.balancer.served(method="ModelInfer", count=seen_infers + 10)[seen:]
        if c.method == "ModelInfer"
    ]
    assert len(calls) == 10 and all(c.grpc_status == "0" for c in calls)
    served = Counter(cluster.index_of(c.upstreams[-1]) for c in calls)
    assert served == {0: 5, 1: 5}
    after = [_count(PLAINTEXT_OK, r.metrics()) for r in cluster.replicas]
    assert [a - b for a, b in zip(after, before, strict=True)] == [5, 5]


def test_tls_ends_at_the_balancer(cluster, tmp_path):
    """The TLS variant: clients verify nginx's certificate; nginx speaks h2c to the replicas."""
    pki = make_pki(tmp_path / "pki")
    cluster.balancer.stop()
    cluster.tls = (pki / "server.crt", pki / "server.key")
    cluster.start_balancer()
    x = np.random.default_rng(2).normal(size=(1, 30)).astype(np.float32)
    try:
        with HegateClient(
            cluster.target, fast_path_target=cluster.fast_path_target, tls_ca_file=pki / "ca.crt"
        ) as client:
            plain = client.predict(MODEL, x)
            with client.encrypted_session(MODEL) as session:
                result = session.predict(x)
        np.testing.assert_allclose(result.logits, plain, atol=session.spec.logit_error_bound + session.keys.logit_grid)
    finally:
        cluster.balancer.stop()
        cluster.tls = None
        cluster.start_balancer()


def test_calls_go_on_when_a_replica_dies(cluster):
    """Kill the replica that holds a key set: its next call reaches the other replica (nginx skips
    the dead one), which answers NOT_FOUND (in-memory stores), and the SDK registers the keys there
    once; a key set on the surviving replica is not disturbed; plaintext calls all succeed."""
    x = np.random.default_rng(3).normal(size=(2, 30)).astype(np.float32)
    with HegateClient(cluster.target, fast_path_target=cluster.fast_path_target) as client:
        infers = sum(c.method == "Infer" for c in cluster.balancer.served())
        holder = {}
        sessions = []
        while len(set(holder.values())) < 2 and len(sessions) < 16:
            session = client.encrypted_session(MODEL)
            sessions.append(session)
            session.predict(x)
            holder[session.key_id] = cluster.index_of(cluster.balancer.upstream_of(session.key_id))
        doomed = next(s for s in sessions if holder[s.key_id] == 0)
        survivor = next(s for s in sessions if holder[s.key_id] == 1)
        cluster.kill(0)
        infers += len(sessions)
        logged = cluster.balancer.served(method="Infer", count=infers)
        seen, plaintext = len(logged), sum(c.method == "ModelInfer" for c in logged)
        doomed.predict(x)
        survivor.predict(x)
        for _ in range(4):
            client.predict(MODEL, x)
        assert doomed.registrations == 2 and survivor.registrations == 1
        cluster.balancer.served(method="Infer", count=infers + 3)
        calls = cluster.balancer.served(method="ModelInfer", count=plaintext + 4)[seen:]
        assert all(cluster.index_of(c.upstreams[-1]) == 1 for c in calls)
        assert [c.method for c in calls if c.grpc_status not in ("0", "-")] == ["Infer"]  # the NOT_FOUND
    cluster.start_replica(0)


def test_the_whole_cluster_restarts_on_its_ports(cluster):
    """What the shared-store test does after the merge: stop nginx and every replica, start them
    again where they were, and call with a session made before. With in-memory stores the keys
    died with the replicas, so the session registers them once more."""
    x = np.random.default_rng(4).normal(size=(2, 30)).astype(np.float32)
    with HegateClient(cluster.target) as client:
        session = client.encrypted_session(MODEL)
        session.predict(x)
        assert cluster.stop() == [0, 0]
        cluster.start()
        session.predict(x)
        assert session.registrations == 2
        session.close()


@pytest.fixture
def redis_cluster(tmp_path, redis_server):
    """Two replicas on one Redis key store behind nginx."""
    cluster = Cluster(tmp_path, small_repository(tmp_path / "repository"), args=("--key-store", redis_server.url))
    cluster.start()
    yield cluster
    cluster.stop()


def test_with_a_shared_store_keys_outlive_their_replica_and_the_whole_cluster(redis_cluster):
    """Issue 15: register through the balancer; kill the replica that holds the keys: the next call
    succeeds on the other replica, which loads them from Redis (no second registration); stop nginx,
    both replicas (and nothing else), start them again: the keys still work without re-registering."""
    cluster = redis_cluster
    x = np.random.default_rng(5).normal(size=(2, 30)).astype(np.float32)
    with HegateClient(cluster.target) as client:
        session = client.encrypted_session(MODEL)
        expected = session.predict(x).logits.argmax(1).tolist()
        holder = cluster.index_of(cluster.balancer.upstream_of(session.key_id))
        cluster.kill(holder)
        assert session.predict(x).logits.argmax(1).tolist() == expected
        other = cluster.replicas[1 - holder]
        assert _count(COLD_LOADS, other.metrics()) == 1  # it loaded the keys it had never seen, from Redis
        cluster.stop()
        cluster.start()
        assert session.predict(x).logits.argmax(1).tolist() == expected
        assert session.registrations == 1
