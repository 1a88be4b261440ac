"""Sharded build and search on Ray: msmarco-5k in 4 shards, updates, faults, bad input, the CLI.

A local Ray cluster (2 CPUs, no dashboard, on a loopback address) is started once for the
session and torn down at the end; a second "node" joins it in one test. Every wait is bounded.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the sharded tests need Ray: pip install -e '.[ray]' (CI installs it)")

import plaid  # noqa: E402
from conftest import REPO, SMALL_INDEXER, requires_msmarco  # noqa: E402
from plaid.cli import main  # noqa: E402
from plaid.distributed import ShardedIndex, ShardUnavailableError, build_sharded  # noqa: E402
from plaid.distributed.sharded import (SHARDED_MANIFEST, ShardedManifest, ShardEntry,  # noqa: E402
                                       commit_sharded_manifest)
from plaid.errors import FormatVersionError, IndexCorruptError, IndexNotFoundError, InvalidInputError  # noqa: E402
from plaid.indexing.indexer import TrainedParams  # noqa: E402

#: Ray rewrites 127.0.0.1 to the machine's network address; another loopback address keeps every
#: connection of the test cluster on the loopback interface.
LOOPBACK = "127.0.0.2"
SECOND_NODE = "127.0.0.3"


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray for the session: 2 CPUs, no dashboard, loopback only. Yields its GCS address."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=False,
             logging_level="WARNING")
    gcs = ray.get_runtime_context().gcs_address
    yield gcs
    ray.shutdown()
    current = "/tmp/ray/ray_current_cluster"  # Ray's pointer to "the" cluster: never leave ours behind
    try:
        with open(current) as f:
            if f.read().strip() == gcs:
                os.unlink(current)
    except OSError:
        pass


def _ids(n, prefix="doc-"):
    return [f"{prefix}{i}" for i in range(n)]


def _files(path):
    """name -> bytes of every file of an index folder (the writer lock and journal aside)."""
    out = {}
    for name in sorted(os.listdir(path)):
        if not name.startswith("."):
            with open(os.path.join(path, name), "rb") as f:
                out[name] = f.read()
    return out


def reference_merge(results, k):
    """Per query: [(global id, score)] of the best k over the shards' results, by (-score, id)."""
    out = []
    for q in range(len(results[0][0])):
        hits = [(int(g), float(s)) for gids, scores in results for g, s in zip(gids[q], scores[q]) if g >= 0]
        hits.sort(key=lambda h: (-h[1], h[0]))
        out.append(hits[:k])
    return out


def sequential_results(sharded_path, queries, k, subset=None, threads=1, **params):
    """Search each shard folder in turn with a plain plaid.Searcher, local ids mapped to global
    (``subset``: global ids, one set for all queries). ``threads``: torch threads, as many as each
    shard actor uses (float32 sums split over another number of threads may differ in the last bit)."""
    import torch

    si = ShardedIndex(sharded_path)
    routing = si.routing
    parts = []
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, p in enumerate(si.shard_paths()):
            sub = None
            if subset is not None:
                shard, local = routing.locate(np.asarray(subset))
                sub = local[shard == i].tolist()
                if not sub:
                    continue
            r = plaid.Searcher(p).search(queries, k=k, subset=sub, **params)
            parts.append((routing.to_global(i, r.ids), r.scores))
    finally:
        torch.set_num_threads(saved)
    return reference_merge(parts, k)


def as_pairs(res):
    return [[(int(g), float(s)) for g, s in zip(gids, scores) if g >= 0] for gids, scores in zip(res.ids, res.scores)]


def recall_at(ids, exact, k):
    top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(b.tolist())) / k for a, b in zip(ids, top)]))


# -- msmarco-5k in 4 shards ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def msmarco_sharded(tmp_path_factory, ray_cluster, msmarco):
    path = str(tmp_path_factory.mktemp("sharded") / "msmarco4")
    si = build_sharded(path, msmarco.embeddings, num_shards=4, doc_ids=msmarco.doc_ids,
                       indexer=dict(show_progress=False))
    return path, si


@requires_msmarco
def test_msmarco_shards_are_byte_identical_to_a_one_process_build(msmarco_sharded, msmarco, msmarco_default,
                                                                 tmp_path):
    path, si = msmarco_sharded
    assert si.num_shards == 4 and si.num_documents == len(msmarco.doc_ids)
    # the driver trained exactly what a one-process Indexer.build of the whole corpus trains
    trained = TrainedParams.from_index(msmarco_default)
    assert si.manifest["codec_fingerprint"] == trained.fingerprint()
    # each shard: its documents encoded in this process with that training, byte for byte
    emb = msmarco.embeddings
    for i, (shard, run) in enumerate(zip(si.shard_paths(), si.manifest["routing"])):
        start, pos, local, count = run
        assert (pos, local) == (i, 0)
        lo, hi = emb.offsets[start], emb.offsets[start + count]
        ref = str(tmp_path / f"ref{i}")
        plaid.Indexer(show_progress=False).build_trained(
            ref, plaid.Embeddings(emb.vectors[lo:hi], emb.doclens[start : start + count]), trained,
            doc_ids=msmarco.doc_ids[start : start + count])
        assert _files(shard) == _files(ref), f"shard {i} differs from the one-process build"
    tokens = [plaid.Index(p).num_tokens for p in si.shard_paths()]
    assert max(tokens) / min(tokens) < 1.05  # cut at equal token counts
    assert plaid.ShardedIndex(path).verify() == []


@pytest.fixture(scope="module")
def msmarco_searcher(msmarco_sharded):
    with plaid.ShardedSearcher(msmarco_sharded[0]) as ss:
        yield ss


@requires_msmarco
@pytest.mark.parametrize("k", [10, 100])
def test_msmarco_merged_results_equal_searching_the_shards_in_turn(msmarco_sharded, msmarco_searcher, msmarco, k):
    path, _ = msmarco_sharded
    res = msmarco_searcher.search(msmarco.queries, k=k)
    assert res.ids.shape == (len(msmarco.queries), k) and not res.missing_shards
    assert as_pairs(res) == sequential_results(path, msmarco.queries, k, threads=msmarco_searcher.threads_per_shard)
    # external ids preserved: global ids are corpus positions
    assert res.doc_ids() == [[msmarco.doc_ids[g] if g >= 0 else None for g in row] for row in res.ids.tolist()]


@requires_msmarco
def test_msmarco_sharded_recall_matches_one_index(msmarco_searcher, msmarco, msmarco_default):
    sharded = recall_at(msmarco_searcher.search(msmarco.queries, k=10).ids, msmarco.exact, 10)
    whole = recall_at(plaid.Searcher(msmarco_default).search(msmarco.queries, k=10).ids, msmarco.exact, 10)
    # each shard keeps its own candidate budget: a sharded search may find more, never much less
    assert sharded >= whole - 0.01, (sharded, whole)
    assert sharded > 0.9


# -- small synthetic corpus ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_sharded(tmp_path_factory, ray_cluster, small_corpus):
    """3 shards of the 600-document corpus (ids doc-<i>); copy it before changing it."""
    docs, _ = small_corpus
    path = str(tmp_path_factory.mktemp("sharded") / "small3")
    build_sharded(path, docs, num_shards=3, doc_ids=_ids(len(docs)), indexer=SMALL_INDEXER)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_one_shard_is_the_one_process_build(tmp_path, ray_cluster, mini_corpus):
    docs, _ = mini_corpus
    build_sharded(str(tmp_path / "s"), docs, num_shards=1, doc_ids=_ids(len(docs)), indexer=SMALL_INDEXER)
    plaid.Indexer(**SMALL_INDEXER).build(str(tmp_path / "one"), docs, doc_ids=_ids(len(docs)))
    assert _files(str(tmp_path / "s" / "shard-0")) == _files(str(tmp_path / "one"))


def test_a_pooled_sharded_build_pools_every_shard(tmp_path, ray_cluster, mini_corpus):
    """Training on the driver sees pooled vectors, each task pools its documents the same way (the
    shards are byte for byte build_trained of their documents), and a shard opened by a later add
    pools too. The search depth reaches every shard and the sharded manifest, which searches read."""
    from plaid.distributed.searcher import _params
    from plaid.indexing.pooling import pooled_doclens

    docs, _ = mini_corpus
    ix = dict(SMALL_INDEXER, pool_factor=2, search_depth=3)
    path = str(tmp_path / "s")
    built = build_sharded(path, docs[:100], num_shards=2, doc_ids=_ids(100), indexer=ix, max_shard_documents=60)
    trained = plaid.Indexer(**ix).train(docs[:100])
    assert trained.pooling == {"method": "ward", "factor": 2}
    assert built.manifest["codec_fingerprint"] == trained.fingerprint()
    start = 0
    for i, shard in enumerate(built.shard_paths()):
        index = plaid.Index(shard)
        n = index.num_documents
        assert index.pooling == {"method": "ward", "factor": 2}
        assert index.num_tokens == int(pooled_doclens(np.array([len(d) for d in docs[start:start + n]]), 2).sum())
        one = str(tmp_path / f"one{i}")
        plaid.Indexer(**dict(SMALL_INDEXER, search_depth=3)).build_trained(one, docs[start:start + n], trained,
                                                                     doc_ids=_ids(100)[start:start + n])
        assert _files(shard) == _files(one)
        start += n
    assert built.info()["pooling"] == {"method": "ward", "factor": 2}
    assert built.manifest["build"]["search_depth"] == 3 and plaid.Index(shard).search_depth == 3
    assert built.info()["search_depth"] == 3
    assert _params(10, None, None, None, built.manifest["build"]["search_depth"])["ndocs"] == 768
    si = ShardedIndex(path)
    si.add(docs[100:], doc_ids=_ids(20, "x"), show_progress=False)  # past max_shard_documents: a new shard
    si.refresh()
    new = plaid.Index(si.shard_paths()[-1])
    assert len(si.shard_paths()) == 3 and new.pooling == {"method": "ward", "factor": 2} and new.search_depth == 3
    assert new.num_tokens == int(pooled_doclens(np.array([len(d) for d in docs[100:]]), 2).sum())
    assert si.verify() == []


def test_small_sharded_search_subsets_and_errors(small_sharded, small_corpus):
    docs, queries = small_corpus
    with plaid.ShardedSearcher(small_sharded) as ss:
        assert ss.num_shards == 3 and ss.num_documents == len(docs)
        res = ss.search(queries, k=10)
        assert as_pairs(res) == sequential_results(small_sharded, queries, 10)
        # one subset for every query, external ids spanning the shards: exact within it
        pick = [0, 5, 250, 251, 420, 599]
        sub = ss.search(queries, k=4, subset=[f"doc-{i}" for i in pick])
        assert as_pairs(sub) == sequential_results(small_sharded, queries, 4, subset=pick)
        # the same subset by global ids; one per query; mixed
        assert np.array_equal(ss.search(queries, k=4, subset=pick).ids, sub.ids)
        per_query = ss.search(queries[:2], k=3, subset=[[1, 2, 3], ["doc-400", 401, "doc-402"]])
        assert set(per_query.ids[0].tolist()) == {1, 2, 3} and set(per_query.ids[1].tolist()) == {400, 401, 402}
        assert per_query.shards[0] == ["shard-0"] * 3
        with pytest.raises(InvalidInputError, match="unknown"):
            ss.search(queries, k=4, subset=["doc-1", "no-such-doc"])
        with pytest.raises(InvalidInputError, match="unknown"):
            ss.search(queries, k=4, subset=[3, 600])
        with pytest.raises(InvalidInputError, match="k must be"):
            ss.search(queries, k=0)
        with pytest.raises(InvalidInputError, match="dim"):
            ss.search(np.zeros((3, 7), np.float32))


def test_add_delete_and_filtered_search_through_the_sharded_api(small_sharded, small_corpus, tmp_path):
    docs, queries = small_corpus
    path = _copy(small_sharded, tmp_path / "s")
    si = ShardedIndex(path)
    sizes = [len(plaid.Index(p)) for p in si.shard_paths()]
    smallest = int(np.argmin(sizes))
    new = [d + 0 for d in docs[:5]]  # copies of documents 0..4, under new ids
    ids = si.add(new, doc_ids=[f"new-{i}" for i in range(5)], show_progress=False)
    assert ids.tolist() == list(range(600, 605))
    si.refresh()
    assert [len(plaid.Index(p)) for p in si.shard_paths()][smallest] == sizes[smallest] + 5
    gens = [plaid.Index(p).generation for p in si.shard_paths()]
    assert [s["generation"] for s in si.manifest["shards"]] == gens  # the manifest serves what the shards hold
    with pytest.raises(InvalidInputError, match="already in the index"):
        si.add(docs[:1], doc_ids=["doc-7"])
    with pytest.raises(InvalidInputError, match="doc_ids"):
        si.add(docs[:1])
    with plaid.ShardedSearcher(path) as ss:
        res = ss.search([docs[0]], k=2)  # document 0 and its copy 600 score alike
        assert set(res.ids[0].tolist()) == {0, 600}
        assert set(res.doc_ids()[0]) == {"doc-0", "new-0"}
        # delete by external and by global id, each routed to its owner shard
        assert si.delete(["doc-0", 601, "new-2"]) == 3
        si.refresh()
        assert si.deleted_ids().tolist() == [0, 601, 602]
        with pytest.raises(InvalidInputError, match="unknown or deleted"):
            si.delete(["doc-0"])
        with pytest.raises(InvalidInputError, match="unknown or deleted"):
            si.delete([10_000])
        ss.reload()
        res = ss.search([docs[0], docs[1], docs[2]], k=10)
        assert not {0, 601, 602} & set(res.ids.ravel().tolist())
        assert res.ids[1, 0] == 1
        # filtered search after the changes: deleted members of a subset are ignored, exact otherwise
        sub = ss.search(queries, k=3, subset=["doc-0", "doc-1", "new-3", "new-4", 250])
        assert set(sub.ids.ravel().tolist()) <= {1, 603, 604, 250}
        before = ss.search(queries, k=10)
        si.compact(show_progress=False)
        assert ss.reload()
        after = ss.search(queries, k=10)  # compaction keeps every id and every score
        assert np.array_equal(after.ids, before.ids) and np.array_equal(after.scores, before.scores)
    assert ShardedIndex(path).verify() == []
    assert len(ShardedIndex(path)) == 602


def test_add_past_the_size_limit_opens_a_new_shard(small_corpus, ray_cluster, tmp_path):
    docs, _ = small_corpus
    path = str(tmp_path / "s")
    build_sharded(path, docs[:300], num_shards=2, doc_ids=_ids(300), indexer=SMALL_INDEXER, max_shard_documents=160)
    si = ShardedIndex(path)
    with plaid.ShardedSearcher(path) as ss:
        ids = si.add(docs[300:340], doc_ids=_ids(40, "x"), show_progress=False)
        si.refresh()
        assert si.shard_names == ["shard-0", "shard-1", "shard-2"] and ids.tolist() == list(range(300, 340))
        assert plaid.Index(si.shard_paths()[2]).num_documents == 40
        assert ss.reload() and ss.num_shards == 3
        res = ss.search([docs[310]], k=1)
        assert res.ids[0, 0] == 310 and res.shards[0][0] == "shard-2" and res.doc_ids()[0][0] == "x10"
    assert si.verify() == []


def test_an_add_interrupted_before_the_sharded_commit_is_hidden_then_undone(small_sharded, small_corpus, tmp_path):
    docs, _ = small_corpus
    path = _copy(small_sharded, tmp_path / "s")
    shard1 = os.path.join(path, "shard-1")
    n1 = plaid.Index(shard1).num_documents
    plaid.Index(shard1).add([docs[3] + 0], doc_ids=["ghost"], show_progress=False)  # the shard committed, not the index
    with plaid.ShardedSearcher(path) as ss:
        res = ss.search([docs[3]], k=3)
        assert 3 in res.ids[0] and "ghost" not in res.doc_ids()[0]  # the ghost has no global id: never returned
        with pytest.raises(InvalidInputError, match="unknown"):
            ss.search([docs[3]], k=3, subset=["ghost"])
    si = ShardedIndex(path)
    si.delete(["doc-5"])  # the next sharded write deletes the ghost in its shard and records the generation
    assert plaid.Index(shard1).deleted_ids().tolist() == [n1]
    si.refresh()
    assert si.manifest["shards"][1]["generation"] == plaid.Index(shard1).generation
    assert si.verify() == []


# -- faults ---------------------------------------------------------------------------------------------
def _pid(ss, shard):
    return next(a["pid"] for a in ss.actor_info() if a["shard"] == shard)


def test_a_shard_actor_killed_mid_batch_is_restarted_and_the_query_retried(small_sharded, small_corpus):
    _, queries = small_corpus
    with plaid.ShardedSearcher(small_sharded, timeout=60) as ss:
        want = ss.search(queries, k=10)
        pid = _pid(ss, "shard-1")
        ray.get(ss.actor("shard-1").debug_delay.remote(5.0, 1), timeout=30)
        out = {}
        th = threading.Thread(target=lambda: out.update(res=ss.search(queries, k=10)))
        t = time.monotonic()
        th.start()
        time.sleep(1.5)  # the batch is in flight in shard-1's actor
        os.kill(pid, signal.SIGKILL)
        th.join(90)
        assert not th.is_alive() and "res" in out
        assert np.array_equal(out["res"].ids, want.ids) and np.array_equal(out["res"].scores, want.scores)
        assert not out["res"].missing_shards and time.monotonic() - t < 60
        assert _pid(ss, "shard-1") != pid  # Ray restarted it


def test_a_shard_that_stays_down_is_an_error_or_a_partial_result_within_the_timeout(small_sharded, small_corpus):
    _, queries = small_corpus
    with plaid.ShardedSearcher(small_sharded, max_restarts=0, timeout=20) as ss:
        full = ss.search(queries, k=10)
        os.kill(_pid(ss, "shard-2"), signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(ShardUnavailableError, match="shard-2") as e:
            ss.search(queries, k=10)
        assert e.value.shards == ["shard-2"] and time.monotonic() - t < 20
        t = time.monotonic()
        part = ss.search(queries, k=10, allow_partial=True)
        assert time.monotonic() - t < 20 and part.missing_shards == ["shard-2"]
        assert "shard-2" not in {s for row in part.shards for s in row}
        # what the two other shards give, merged (searched with the actors' thread count: float32
        # sums split over another number of threads may differ in the last bit)
        import torch

        si = ShardedIndex(small_sharded)
        parts = []
        saved = torch.get_num_threads()
        torch.set_num_threads(ss.threads_per_shard)
        try:
            for i in (0, 1):
                r = plaid.Searcher(si.shard_paths()[i]).search(queries, k=10)
                parts.append((si.routing.to_global(i, r.ids), r.scores))
        finally:
            torch.set_num_threads(saved)
        assert as_pairs(part) == reference_merge(parts, 10)
        assert as_pairs(full) != as_pairs(part)


def test_a_hanging_shard_times_out(small_sharded, small_corpus):
    _, queries = small_corpus
    with plaid.ShardedSearcher(small_sharded, timeout=3) as ss:
        ray.get(ss.actor("shard-0").debug_delay.remote(30.0, 2), timeout=30)
        t = time.monotonic()
        with pytest.raises(ShardUnavailableError, match=r"shard-0.*no answer within 3 s"):
            ss.search(queries[:2], k=5)
        assert time.monotonic() - t < 8
        part = ss.search(queries[:2], k=5, allow_partial=True)
        assert part.missing_shards == ["shard-0"] and time.monotonic() - t < 16


@pytest.fixture
def second_node(ray_cluster):
    """A second raylet joined to the session's cluster (``ray start --address``, 1 CPU, on another
    loopback address), in its own process group; yields that process, killed at the end."""
    node = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--address", ray_cluster, "--node-ip-address",
         SECOND_NODE, "--num-cpus", "1", "--block", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        # alive, and its CPU counted by the scheduler (a node alive before its resources are
        # reported gets no actor: CI once saw all three shards placed on the first node)
        while not any(n["Alive"] and n.get("NodeManagerAddress") == SECOND_NODE and n.get("Resources", {}).get("CPU")
                      for n in ray.nodes()) or ray.available_resources().get("CPU", 0) < 1:
            assert time.monotonic() < deadline, "the second node did not join within 60 s"
            assert node.poll() is None, "ray start exited"
            time.sleep(0.5)
        yield node
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(30)


def test_a_second_node_that_dies_takes_its_actors_elsewhere(small_sharded, small_corpus, second_node):
    """Shard actors are spread over both nodes; when the second node dies, Ray restarts its
    actors on the first and the searches in flight are retried."""
    _, queries = small_corpus
    for attempt in range(3):  # SPREAD is best effort: a node that has just joined may get no actor
        ss = plaid.ShardedSearcher(small_sharded, num_cpus_per_shard=0.25, max_restarts=2, timeout=90)
        nodes = {a["shard"]: a["node"] for a in ss.actor_info()}
        if set(nodes.values()) == {LOOPBACK, SECOND_NODE} or attempt == 2:
            break
        ss.close()
        time.sleep(2)
    with ss:
        assert set(nodes.values()) == {LOOPBACK, SECOND_NODE}, nodes  # SPREAD over both nodes
        want = ss.search(queries, k=10)
        os.killpg(second_node.pid, signal.SIGTERM)  # the node dies with the actors it holds
        second_node.wait(60)
        res = ss.search(queries, k=10)
        assert np.array_equal(res.ids, want.ids) and not res.missing_shards
        assert {a["node"] for a in ss.actor_info()} == {LOOPBACK}


def test_join_an_existing_cluster_from_another_process(small_sharded, small_corpus, ray_cluster, tmp_path):
    _, queries = small_corpus
    np.save(tmp_path / "q.npy", np.stack([q[:4] for q in queries[:3]]))
    code = (f"import numpy as np, plaid\n"
            f"ss = plaid.ShardedSearcher({small_sharded!r}, ray_address='auto')\n"
            f"print('IDS', ss.search(np.load({str(tmp_path / 'q.npy')!r}), k=5).ids.tolist())\n")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("IDS ")).split(" ", 1)[1])
    with plaid.ShardedSearcher(small_sharded) as ss:
        assert got == ss.search([q[:4] for q in queries[:3]], k=5).ids.tolist()


def test_plaid_starts_a_local_ray_when_given_no_address(small_sharded, small_corpus, tmp_path):
    _, queries = small_corpus
    code = (f"import plaid, ray, numpy as np\n"
            f"ss = plaid.ShardedSearcher({small_sharded!r}, ray_init_options={{'_node_ip_address': {LOOPBACK!r}}})\n"
            f"assert ray.is_initialized() and len(ray.nodes()) == 1\n"
            f"print('IDS', ss.search(np.load({str(tmp_path / 'q.npy')!r}), k=3).ids.tolist())\n")
    np.save(tmp_path / "q.npy", np.stack([q[:4] for q in queries[:2]]))
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "IDS [[" in p.stdout


def test_a_ray_address_that_does_not_answer_is_an_error_within_the_timeout():
    code = ("import time, plaid.distributed as d\n"
            "t = time.monotonic()\n"
            "try:\n"
            f"    d.connect('{LOOPBACK}:9', timeout=5)\n"
            "except d.RayUnavailableError as e:\n"
            "    print('ERR', round(time.monotonic() - t, 1), e)\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("ERR "))
    assert f"{LOOPBACK}:9" in line and "did not answer within 5 s" in line
    assert time.monotonic() - t < 30


# -- bad input ------------------------------------------------------------------------------------------
def test_shards_whose_codecs_differ_are_refused(small_sharded, small_corpus, tmp_path):
    docs, _ = small_corpus
    path = _copy(small_sharded, tmp_path / "s")
    start, _, _, count = ShardedIndex(path).manifest["routing"][1]
    shutil.rmtree(os.path.join(path, "shard-1"))  # the same documents, trained with another seed
    plaid.Indexer(**SMALL_INDEXER, seed=5).build(os.path.join(path, "shard-1"), docs[start : start + count],
                                                 doc_ids=_ids(len(docs))[start : start + count])
    with pytest.raises(IndexCorruptError, match="shard shard-1 was trained with another codec"):
        plaid.ShardedSearcher(path)
    problems = ShardedIndex(path).verify()
    assert len(problems) == 1 and "shard-1" in problems[0] and "another codec" in problems[0]


def test_a_missing_shard_or_one_of_another_version_is_refused(small_sharded, tmp_path):
    path = _copy(small_sharded, tmp_path / "s")
    shutil.rmtree(os.path.join(path, "shard-2"))
    with pytest.raises(IndexNotFoundError, match="shard shard-2 is missing"):
        plaid.ShardedSearcher(path)
    with pytest.raises(IndexNotFoundError, match="shard-2"):
        ShardedIndex(path).delete(["doc-1"])
    assert "shard-2" in ShardedIndex(path).verify()[0]
    path = _copy(small_sharded, tmp_path / "v")
    mpath = os.path.join(path, "shard-0", "manifest.json")
    m = json.load(open(mpath))
    m["format_version"] = 99
    os.chmod(mpath, 0o644)
    with open(mpath, "w") as f:
        json.dump(m, f)
    with pytest.raises(FormatVersionError, match="shard shard-0"):
        plaid.ShardedSearcher(path)
    path = _copy(small_sharded, tmp_path / "w")
    mpath = os.path.join(path, SHARDED_MANIFEST)
    m = json.load(open(mpath))
    m["format_version"] = 2
    with open(mpath, "w") as f:
        json.dump(m, f)
    with pytest.raises(FormatVersionError, match="sharded index format version 2"):
        ShardedIndex(path)
    m["format_version"], m["routing"][1][0] = 1, 7
    with open(mpath, "w") as f:
        json.dump(m, f)
    with pytest.raises(IndexCorruptError, match=r"routing\[1\]"):
        plaid.ShardedSearcher(path)
    m["routing"][1][0] = json.load(open(os.path.join(small_sharded, SHARDED_MANIFEST)))["routing"][1][0]
    for bad in ("4", 0, 65, 2.0, True, [4]):  # the search depth the driver applies to every shard
        m["build"]["search_depth"] = bad
        with open(mpath, "w") as f:
            json.dump(m, f)
        with pytest.raises(IndexCorruptError, match="build.search_depth"):
            ShardedIndex(path)


def test_duplicate_external_ids_across_shards_are_refused(mini_corpus, ray_cluster, tmp_path):
    docs, _ = mini_corpus
    root = str(tmp_path / "dup")
    os.makedirs(root)
    ix = plaid.Indexer(**SMALL_INDEXER)
    trained = ix.train(docs)
    a = ix.build_trained(os.path.join(root, "shard-0"), docs[:60], trained, doc_ids=_ids(60))
    b = ix.build_trained(os.path.join(root, "shard-1"), docs[60:], trained, doc_ids=_ids(59, "b") + ["doc-7"])
    commit_sharded_manifest(root, ShardedManifest(
        generation=0, dim=trained.dim, num_documents=len(docs), has_doc_ids=True, codec=trained.codec.params(),
        normalized=trained.normalized, codec_fingerprint=trained.fingerprint(), max_shard_documents=None,
        next_shard=2, shards=(ShardEntry("shard-0", a.generation, 60), ShardEntry("shard-1", b.generation, 60)),
        routing=((0, 0, 0, 60), (60, 1, 0, 60))), new=True)
    with pytest.raises(IndexCorruptError, match="'doc-7' is live in shard-0 and shard-1"):
        plaid.ShardedSearcher(root)
    assert any("'doc-7'" in p for p in ShardedIndex(root).verify())


def test_zero_shards_and_bad_parameters_are_refused(small_corpus, ray_cluster, tmp_path, capsys):
    docs, _ = small_corpus
    with pytest.raises(InvalidInputError, match="num_shards must be a positive integer, got 0"):
        build_sharded(str(tmp_path / "z"), docs, num_shards=0)
    with pytest.raises(InvalidInputError, match="num_shards=700 exceeds the 600 documents"):
        build_sharded(str(tmp_path / "z"), docs, num_shards=700, indexer=SMALL_INDEXER)
    assert not os.path.exists(tmp_path / "z")
    code = main(["index", str(tmp_path / "c"), "--embeddings", str(tmp_path), "--shards", "0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--shards" in err and "'0'" in err


def test_a_build_that_fails_part_way_leaves_no_sharded_index(small_corpus, ray_cluster, tmp_path):
    from plaid.indexing.kmeans import sample_token_ids

    docs, _ = small_corpus
    vectors = np.concatenate(docs)
    doclens = np.array([len(d) for d in docs])
    opts = dict(SMALL_INDEXER, num_centroids=32, kmeans_points_per_centroid=8, codec_sample=256)
    sampled = set(sample_token_ids(len(vectors), 256, 0).tolist())
    token = next(t for t in range(len(vectors) - 1, 0, -1) if t not in sampled)  # in the last shard
    vectors[token, 0] = np.nan  # not in the training sample: found by the task encoding that shard
    np.save(tmp_path / "v.npy", vectors)
    broken = plaid.Embeddings(np.load(tmp_path / "v.npy", mmap_mode="r"), doclens)  # each task maps the file
    path = str(tmp_path / "broken")
    with pytest.raises(InvalidInputError, match=r"shard-2 \(documents \d+\.\.599 .*contains NaN"):
        build_sharded(path, broken, num_shards=3, indexer=opts)
    assert not os.path.exists(path)  # no manifest, no shard folders, no directory
    with pytest.raises(IndexNotFoundError):
        ShardedIndex(path)
    # with overwrite over an existing sharded index, that one stays as it was
    good = str(tmp_path / "good")
    build_sharded(good, docs[:300], num_shards=2, indexer=opts)
    before = ShardedIndex(good).manifest
    with pytest.raises(InvalidInputError, match="NaN"):
        build_sharded(good, broken, num_shards=3, indexer=opts, overwrite=True)
    assert ShardedIndex(good).manifest == before and sorted(os.listdir(good)) == [".plaid-lock", "shard-0", "shard-1",
                                                                                 SHARDED_MANIFEST]
    assert ShardedIndex(good).verify() == []


# -- the command line --------------------------------------------------------------------------------
def test_cli_index_search_info_verify_a_sharded_index(small_corpus, ray_cluster, tmp_path, capsys):
    from test_cli import _write_bundle

    docs, queries = small_corpus
    bundle = _write_bundle(tmp_path / "bundle", docs, _ids(len(docs)))
    np.save(tmp_path / "bundle" / "query_embeddings.f16.npy", np.concatenate(queries).astype(np.float16))
    np.save(tmp_path / "bundle" / "query_lens.npy", np.array([len(q) for q in queries], np.int32))
    (tmp_path / "bundle" / "query_ids.txt").write_text("".join(f"q{i}\n" for i in range(len(queries))))
    out = str(tmp_path / "idx")
    assert main(["index", out, "--embeddings", bundle, "--shards", "2", "--pq-m", "16", "--quiet",
                 "--ray-address", ray_cluster]) == 0
    assert ShardedIndex(out).num_shards == 2
    run = str(tmp_path / "run.trec")
    assert main(["search", out, "--query-embeddings", bundle, "--k", "5", "--output", run, "--quiet"]) == 0
    lines = open(run).read().splitlines()
    assert len(lines) == 5 * len(queries) and lines[0].split()[2].startswith("doc-")
    capsys.readouterr()
    assert main(["info", out, "--verify"]) == 0
    text = capsys.readouterr().out
    assert "sharded plaid index" in text and "shard-1" in text and "verify" in text
    assert main(["info", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_shards"] == 2
    assert main(["verify", out]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {out}: 2 shards intact")
    with open(os.path.join(out, "shard-1", [f for f in os.listdir(os.path.join(out, "shard-1"))
                                             if f.startswith("seg0_residuals")][0]), "r+b") as f:
        f.seek(200)
        f.write(b"\xff\x00\xff")
    assert main(["verify", out]) == 2
    captured = capsys.readouterr()
    assert "shard-1" in captured.out and "checksum" in captured.out
    assert main(["search", str(tmp_path / "bundle"), "--query-embeddings", bundle, "--ray-address", "auto"]) == 2
    assert "apply to a sharded index" in capsys.readouterr().err
