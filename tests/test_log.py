"""rpo_lib.log: the library's messages reach the screen of whoever runs it, once, and can be handed to logging."""

import logging

from rpo_lib import log


def test_messages_go_to_the_current_stdout_once(capsys):
    log.get_logger("rpo_lib.train.trainer").info("kept 1 of 2 pairs")
    log.get_logger("rpo_lib.train.trainer").debug("not shown")
    assert capsys.readouterr().out == "rpo_lib.train: kept 1 of 2 pairs\n"  # the package's name, not the file's


def test_to_root_hands_them_to_the_applications_logging(capsys, caplog):
    library = logging.getLogger("rpo_lib")
    try:
        log.to_root()
        with caplog.at_level(logging.INFO):
            log.get_logger("rpo_lib.env").warning("Colab has another transformers")
        assert capsys.readouterr().out == ""
        assert ("rpo_lib.env", "Colab has another transformers") in [(r.name, r.getMessage()) for r in caplog.records]
    finally:
        library.addHandler(log.HANDLER)
        library.propagate = False


def test_no_library_module_prints():
    """Library code reports through logging or returned objects; print is for the command-line entry points
    (``__main__`` blocks and ``main``), the launcher's echo of its workers, and the functions whose job is to
    show something (``env.print_environment``, the exercise checks)."""
    import ast
    from pathlib import Path

    allowed = {("env.py", "print_environment"), ("launch.py", "main"), ("launch.py", "_relay"),
               ("exercises.py", "check"), ("exercises.py", "check_implementation")}
    found = []
    root = Path(log.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    if (path.name, function.name) not in allowed:
                        found.append(f"{path.relative_to(root)}:{node.lineno} in {function.name}")
    assert not found, found
