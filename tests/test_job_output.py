"""What a successful job may print: no error-level line and no traceback, from any process.

`error_lines` is what the job tests (test_job_train_deep.py, test_job_train_backprop.py, test_sweep.py) apply
to the stdout and stderr of the runs they make anyway; here it is checked against lines in the forms Ray,
Python and the jobs print them.
"""

import re

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ERROR_LINE = re.compile(
    r"\bERROR\b"  # Python's logging and Ray's Python logs; our jobs' log format (cli.setup_logging)
    r"|\[[\d\- :,]+ E \d+ \d+\]"  # Ray's C++ logs: [2026-12-02 07:06:24,846 E 20800 20851] core_worker.cc
    r"|^error: "  # the jobs' own one-line errors
    r"|Traceback \(most recent call last\)"
    r"|^Exception in thread "
)

# A float printed with all its digits (61.550000000000004), or a Python list of numbers: what a log line
# shows when it formats a value with str() instead of to sensible digits.
RAW_NUMBER = re.compile(r"\d\.\d{7,}|\[-?\d+(\.\d+)?(e[-+]?\d+)?, ")


def output_lines(proc) -> list[str]:
    """A finished subprocess's stdout and stderr lines, without colour codes or a Ray process prefix."""
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    plain = (ANSI.sub("", line) for line in lines)
    return [re.sub(r"^\((\w+ )?pid=\d+(, ip=[\d.]+)?\) ", "", line) for line in plain]


def error_lines(proc) -> list[str]:
    """The lines of a job's output that report an error or a traceback."""
    return [line for line in output_lines(proc) if ERROR_LINE.search(line)]


def raw_number_lines(proc) -> list[str]:
    """The lines of a job's output that print a number unformatted."""
    return [line for line in output_lines(proc) if RAW_NUMBER.search(line)]


class _Done:
    def __init__(self, stdout: str, stderr: str):
        self.stdout, self.stderr = stdout, stderr


def test_error_lines_finds_errors_in_every_form_a_job_prints_them():
    stderr = "\n".join(
        [
            "\x1b[36m(TrainController pid=20800)\x1b[0m [2026-12-02 07:06:24,846 E 20800 20851] core_worker.cc:2465: "
            "Actor with class name: 'PreemptionWatcher' has constructor arguments in the object store",
            "\x1b[36m(PlacementGroupCleaner pid=21257)\x1b[0m Traceback (most recent call last):",
            "(PlacementGroupCleaner pid=21257) Exception in thread PlacementGroupCleanerMonitor:",
            "2026-12-02 07:08:58,571\tERROR worker.py:421 -- Unhandled error (suppressed 1 times)",
            "07:10:00 ERROR stage 1 failed",
            "ERROR:root:bare logging",
            "error: --depths [] is invalid",
        ]
    )
    assert len(error_lines(_Done("", stderr))) == 7


def test_error_lines_passes_what_a_successful_job_prints():
    stderr = "\n".join(
        [
            "2026-12-02 07:08:58,571\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
            "07:09:29 started a local Ray cluster with 3 logical CPUs",
            "\x1b[36m(RayTrainWorker pid=9316)\x1b[0m backprop epoch 1: loss 2.4742, test accuracy 14.40% (4 steps)",
            "07:10:00 WARNING stage 1 died (RayActorError); recreated from checkpoint step 10",
            "07:10:30 trials: 1 done, 1 running, 2 pending; best finished: hsic depth 2: 37.05%",
            "  hsic      2      done     1      47.45    37.05",
            "| 2 | hsic | 37.05 | 47.45 | 1 | 2.86 | True | - |",
        ]
    )
    assert error_lines(_Done("test accuracy: unformatted 49.10, formatted 35.90\n", stderr)) == []


def test_raw_number_lines_finds_unformatted_floats_and_lists():
    stderr = "\n".join(
        [
            "test accuracy: unformatted 61.550000000000004, formatted 35.90",
            "Reporting training result 1: metrics={'epoch': 1, 'loss': 2.4741645455360413}",
            "grad norms [1.8187623023986816, 0.3835948407649994]",
            "nhsic [0.5, 0.25]",
            "steps [1, 2, 3]",
        ]
    )
    assert len(raw_number_lines(_Done("", stderr))) == 5


def test_raw_number_lines_passes_formatted_numbers_times_addresses_and_paths():
    stderr = "\n".join(
        [
            "2026-12-02 07:08:58,571\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
            "07:08:24 epoch 1/1  batch 2/15  step 2  loss -3.129e+04  nHSIC(Z,X) 6.6  nHSIC(Z,Y) 3.26 (last layer)",
            "07:08:27 linear probes after epoch 1, test accuracy of the first / best / last layer: 85.50 / 77.60%",
            "07:19:36 run directory: /tmp/w28/bp2  (mnist-sample, 8000 train / 2000 test samples, 1 Ray Train worker)",
            "stage  layers      node              device   pid",
            "1      1-2         192.0.2.2         cpu      23340",
            "/tmp/s/tune/run_trial_50c5e_00000_0_depth=2,method=hsic_2026-12-02_07-09-29/checkpoint_000000",
        ]
    )
    assert (
        raw_number_lines(_Done("test accuracy: formatted 14.40 after 1 epochs (4 steps, 1907 samples/s)", stderr)) == []
    )
