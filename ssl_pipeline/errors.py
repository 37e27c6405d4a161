"""The one exception type for problems a user can fix (recipe, paths, data files, shapes)."""


class SSLPipelineError(Exception):
    """A problem caused by input the user controls.

    The message says what is wrong and how to fix it; the CLI prints it without a traceback
    and exits with status 2.
    """
