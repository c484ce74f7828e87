import torch

from course_lib.attribution import similarity


def test_random_scores_are_seeded():
    a = similarity.random_scores(10, 3, seed=1)
    assert a.shape == (10, 3) and torch.equal(a, similarity.random_scores(10, 3, seed=1))
    assert not torch.equal(a, similarity.random_scores(10, 3, seed=2))


def test_class_match():
    s = similarity.class_match(torch.tensor([0, 1, 1, 2]), torch.tensor([1, 2]))
    assert s.tolist() == [[0, 0], [1, 0], [1, 0], [0, 1]]


def test_pixel_similarity_against_explicit_cosine():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(6, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    y, yt = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 1])
    s = similarity.pixel_similarity(x, y, xt, yt)
    for i in range(6):
        for t in range(2):
            cos = torch.nn.functional.cosine_similarity(x[i].flatten(), xt[t].flatten(), dim=0)
            assert torch.isclose(s[i, t], cos * (1 if y[i] == yt[t] else -1), atol=1e-6)
    # the label sign alone: kept where the labels agree, negated where they differ
    plain = similarity.pixel_similarity(x, y, xt, yt, signed=False)
    assert torch.equal(similarity.label_signed(plain, y, yt), s)
    assert torch.equal(similarity.label_signed(plain, y, yt)[y == 0, 0], plain[y == 0, 0])
    assert torch.equal(similarity.label_signed(plain, y, yt)[y == 1, 0], -plain[y == 1, 0])
    # an image is most similar to itself
    assert similarity.pixel_similarity(x, y, x[:1], y[:1], signed=False).argmax() == 0
