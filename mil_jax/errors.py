"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
  """A mistake in the user's input: reported as one sentence, exit code 2.

  Raise it with a message that names the problem and the fix, e.g.
  ``UserError("unknown data source 'tfds:foo'; use tfds:<name>, npz:<path> or fake.")``.
  The command-line entry points catch it, print the message to stderr and exit
  with status 2; everything else is a bug and keeps its traceback.
  """


class Interrupted(Exception):
  """SIGINT or SIGTERM arrived during training; the current step was saved."""

  def __init__(self, signum: int, step: int):
    import signal  # noqa: PLC0415
    super().__init__(f'stopped by {signal.Signals(signum).name} at step {step}; a checkpoint '
                     'was saved, rerun the same command to resume.')
    self.signum = signum
    self.step = step
