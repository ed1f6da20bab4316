class State:
    """Mirror of modules.shared_state.State: job progress and the Interrupt/Skip flags."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.skipped = False
        self.interrupted = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.processing_has_refined_job_count = False

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0

    def begin(self, job="(unknown)"):
        self.reset()
        self.job = job

    def end(self):
        self.job = ""
        self.job_count = 0
