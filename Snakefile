# nucseg: label-free nucleus segmentation of H&E whole-slide images.
# download + tissue -> synth -> train -> segment + qc signals -> grade + aggregate; see README.md and ../shared/DESIGN.md.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"  # checks the config and the sample sheets first
include: "workflow/rules/tissue.smk"
include: "workflow/rules/synth.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/export.smk"


if "demo" in config:

    include: "workflow/rules/demo.smk"


rule all:
    input:
        all_targets(),
    default_target: True


# On-demand exports of every built slide (`snakemake export_qupath`); `export:` in the config adds them to `all`.
rule export_qupath:
    input:
        export_targets("qupath"),


rule export_tcia:
    input:
        export_targets("tcia"),
