"""Known errors: the CLI turns these into one line and an exit code (2 usage/config, 1 run failed)."""


class GenkitError(Exception):
    """A failure the user can act on; the message says what is wrong and what to do."""

    exit_code = 1


class ConfigError(GenkitError):
    """Bad usage or configuration (unknown key, wrong type, missing file): exit code 2."""

    exit_code = 2

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems in the configuration:\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        super().__init__(msg)


class RunError(GenkitError):
    """The run started but failed (non-finite loss, corrupt checkpoint): exit code 1."""

    exit_code = 1
