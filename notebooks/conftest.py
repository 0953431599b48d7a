"""nbval with a stated tolerance for the numbers in checked outputs (cells marked ``# NBVAL_CHECK_OUTPUT``).

A checked cell's output must equal its stored output, except that a printed number may differ by one unit in
its last printed digit (``0.4437`` may print as ``0.4436`` or ``0.4438``): another CPU rounds a value that lies
on a rounding boundary the other way, and that is no change in what the notebook shows. Everything else (the
text, the count of numbers, their signs, their number of digits, numbers off by more) must match exactly. Cells
whose numbers come out of training runs vary by more than rounding from one CPU to another; they are not
checked this way but by the ``assert``s in the cells, with margins stated there.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _last_digit_unit(token: str) -> float:
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def snap_numbers(reference: str, test: str) -> str:
    """``test`` with each number that is within one last-digit unit of the reference's number at the same
    place replaced by the reference's; ``test`` unchanged if the texts around the numbers differ."""
    if not isinstance(reference, str) or not isinstance(test, str):
        return test
    ref_numbers, test_numbers = NUMBER.findall(reference), NUMBER.findall(test)
    if len(ref_numbers) != len(test_numbers) or NUMBER.split(reference) != NUMBER.split(test):
        return test
    pieces = NUMBER.split(test)
    out = [pieces[0]]
    for ref_token, test_token, piece in zip(ref_numbers, test_numbers, pieces[1:], strict=True):
        same_form = (ref_token.count(".") == test_token.count(".")
                     and _last_digit_unit(ref_token) == _last_digit_unit(test_token)
                     and ref_token.startswith("-") == test_token.startswith("-"))
        close = same_form and abs(float(ref_token) - float(test_token)) <= 1.000001 * _last_digit_unit(ref_token)
        out += [ref_token if close else test_token, piece]
    return "".join(out)


def _snap_outputs(test_outputs: list, ref_outputs: list) -> list:
    """Copies of the test outputs (nbformat nodes) with their text snapped to the reference outputs in the same
    places (the same position, output type and stream)."""
    import copy

    snapped = []
    for index, output in enumerate(test_outputs):
        reference = ref_outputs[index] if index < len(ref_outputs) else None
        output = copy.deepcopy(output)  # a NotebookNode: nbval reads its fields as attributes
        if (reference is not None and reference.get("output_type") == output.get("output_type")
                and reference.get("name") == output.get("name")):  # the same kind (and stream) of output
            if "text" in output and "text" in reference:
                output["text"] = snap_numbers(reference["text"], output["text"])
            for key in output.get("data", {}):
                output["data"][key] = snap_numbers(reference.get("data", {}).get(key), output["data"][key])
        snapped.append(output)
    return snapped


def pytest_configure(config):
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: nothing to adjust
        return
    if getattr(IPyNbCell, "_rpo_tolerance", False):
        return
    compare = IPyNbCell.compare_outputs

    def compare_within_tolerance(self, test, ref, skip_compare=None):
        return compare(self, _snap_outputs(test, ref), ref, skip_compare)

    IPyNbCell.compare_outputs = compare_within_tolerance
    IPyNbCell._rpo_tolerance = True
