"""``AutoFlow`` on both backends, where the test is the same: its arguments are checked when
it is built, with the same messages. The rest is in tests/<backend>/test_autoguide.py."""

import pytest

from tests.conformance.backends import ADAPTERS


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.name)
@pytest.mark.parametrize(
    "options, message",
    [
        ({"flow": "nope"}, "unknown flow 'nope'"),
        ({"flow": "realnvp", "bins": 4}, "no option 'bins'"),
        ({"init_scale": 1e-4}, r"init_scale=0.0001 must lie in \(0.006738, 148.4\)"),
        ({"init_scale": -1.0}, "init_scale=-1.0 must be 'auto', 'laplace' or a positive float"),
    ],
)
def test_bad_arguments_are_refused_when_the_guide_is_built(adapter, options, message):
    def model():  # never run: the arguments are checked first
        pass

    with pytest.raises(ValueError, match=message):
        adapter.pf.AutoFlow(model, **options)
