"""DiffuCoder's local/global AR-ness@k on hand-made decoding orders."""

import json

import pytest

from genkit.errors import ConfigError
from genkit.eval.arness import arness, arness_file, arness_of_order


def test_left_to_right_scores_one_and_right_to_left_zero():
    G = 10
    l2r = arness_of_order([[i] for i in range(G)], G, ks=(1, 2, 4))
    assert all(l2r[f"{kind}@{k}"] == 1.0 for kind in ("local", "global") for k in (1, 2, 4))
    r2l = arness_of_order([[i] for i in reversed(range(G))], G, ks=(1, 3))
    assert r2l["local@1"] == 0.0 and r2l["local@3"] == 0.0
    assert r2l["global@1"] == pytest.approx(1 / G)  # only the last token is then the leftmost mask
    assert r2l["global@3"] == pytest.approx(3 / G)
    # several tokens per pass, filled left to right block by block, is still fully AR
    blocks = arness_of_order([[1, 0, 3, 2], [5, 4, 7, 6]], 8, ks=(1, 2))
    assert blocks["local@2"] == 1.0 and blocks["global@1"] == 1.0


def test_hand_computed_order():
    # order 1, 3, 0, 2 over G = 4 (one token per pass)
    res = arness_of_order([[1], [3], [0], [2]], 4, ks=(1, 2))
    # local@1: 1 after prompt(-1)? no; 3 after 1? no; 0 after 3? no; 2 after 0? no
    assert res["local@1"] == 0.0
    # global@1: masked {0..3}: 1 no; {0,2,3}: 3 no; {0,2}: 0 yes; {2}: 2 yes
    assert res["global@1"] == 0.5
    # global@2: 1 rank 1 yes; 3 rank 2 no; 0 yes; 2 yes
    assert res["global@2"] == 0.75


def test_remasked_tokens_count_again():
    # pass 1 commits 0 and 2, pass 2 re-masks 2 and commits 1, pass 3 commits 2, 3
    res = arness_of_order([[0, 2], [1], [2, 3]], 4, ks=(1,), remask_trace=[[], [2], []])
    assert res["tokens"] == 5
    # events: 0 (g yes, l yes), 2 (g no: 1 is masked; l no), 1 (g yes; l no: previous is 2), 2 (g yes; l yes),
    # 3 (g yes; l yes)
    assert res["global@1"] == pytest.approx(4 / 5) and res["local@1"] == pytest.approx(3 / 5)
    with pytest.raises(ConfigError, match="not masked"):
        arness_of_order([[0], [0]], 2)


def test_arness_of_results_file(tmp_path):
    recs = [{"id": 0, "output_ids": [0] * 4, "trace": [[0], [1], [2], [3]]},
            {"id": 1, "error": "empty line"},
            {"id": 2, "output_ids": [0] * 4, "trace": [[3], [2], [1], [0]]}]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = arness_file(tmp_path, ks=(1,))
    assert res["samples"] == 2 and res["local@1"] == 0.5 and res["global@1"] == pytest.approx((1 + 0.25) / 2)
    with pytest.raises(ConfigError, match="--trace"):
        arness([{"id": 0, "output_ids": [1]}])
