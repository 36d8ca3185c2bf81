"""Dataset validation, generators and loaders."""

import numpy as np
import pytest

from homflow.activations import relu
from homflow.data import Dataset, digits, gaussian_toy, load, save, sphere, teacher_student
from homflow.models import TwoLayer


def test_validation_names_the_problem(key):
    with pytest.raises(ValueError, match="`y` must be a 1-D array of length n = 3"):
        Dataset(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="`X` must be finite"):
        Dataset(np.array([[np.nan, 1.0]]), np.array([1.0]))
    with pytest.raises(ValueError, match=r"labels in \{-1, \+1\} for the exponential loss"):
        Dataset(np.zeros((2, 2)), np.array([1.0, 0.5])).check_for("exponential")
    Dataset(np.zeros((2, 2)), np.array([1.0, 0.5])).check_for("square")  # regression targets are fine
    with pytest.raises(ValueError, match="dimension 5"):
        Dataset(np.zeros((2, 2)), np.ones(2)).check_model(TwoLayer(5, 2, relu, key=key))


def test_gaussian_toy_matches_the_paper_setting():
    d = gaussian_toy(100, separable=True, seed=1)
    X, y = np.asarray(d.X), np.asarray(d.y)
    assert X.shape == (100, 2) and set(np.unique(y)) == {-1.0, 1.0}
    np.testing.assert_allclose(X[y > 0].mean(0), [2, -2], atol=0.5)
    assert np.all(y * (X @ np.array([1.0, -1.0])) > 0)  # separable through the origin
    d2 = gaussian_toy(100, separable=False, seed=1)
    np.testing.assert_allclose(np.asarray(d2.X)[np.asarray(d2.y) > 0].mean(0), [1, -1], atol=0.5)


def test_teacher_student_reproduces_the_canonical_problem():
    import sys

    sys.path.insert(0, "/work/shared/data")
    try:
        from canonical import canonical
    except ImportError:
        pytest.skip("canonical problem file not present")
    X, y, _ = canonical(1)
    d = teacher_student(100, 10, teacher_width=5, p=2, seed=0)
    np.testing.assert_array_equal(np.asarray(d.X), X)
    np.testing.assert_array_equal(np.asarray(d.y), y)


def test_sphere_and_digits():
    s = sphere(20, 3, seed=0, labels="linear")
    np.testing.assert_allclose(np.linalg.norm(np.asarray(s.X), axis=1), 1.0)
    dg = digits((3, 5))
    assert dg.d == 64 and 300 < dg.n < 400
    assert set(np.unique(np.asarray(dg.y))) == {-1.0, 1.0}
    assert digits((3, 5), n=50).n == 50
    with pytest.raises(ValueError, match="two different digits"):
        digits((3, 3))


def test_file_round_trip(tmp_path):
    d = gaussian_toy(10, seed=0)
    save(d, tmp_path / "d.npz")
    d2 = load(tmp_path / "d.npz")
    np.testing.assert_array_equal(np.asarray(d.X), np.asarray(d2.X))
    np.savetxt(tmp_path / "d.csv", np.column_stack([np.asarray(d.X), np.asarray(d.y)]), delimiter=",")
    d3 = load(tmp_path / "d.csv")
    np.testing.assert_allclose(np.asarray(d3.y), np.asarray(d.y))
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing.npz")
