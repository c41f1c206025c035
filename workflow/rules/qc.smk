rule qc_cohort:
    """Per cancer type: the QC table (slides graded with the configured levels), and the type's
    partition of the hive-partitioned nuclei dataset."""
    wildcard_constraints:
        cancer_type=r"(?!slides\.parquet$)[A-Za-z0-9_-]+",  # results/qc/slides.parquet is qc_all's
    input:
        # qc.json stands for its segment job's other outputs (qc_patches.parquet, nuclei.parquet): one
        # declared file per slide is enough to order and re-trigger, and each costs planning time.
        rows=lambda wc: per_slide("results/{cancer_type}/{slide_id}/qc.json", wc.cancer_type),
    output:
        table="results/qc/{cancer_type}.parquet",
        nuclei=directory("results/nuclei/cancer_type={cancer_type}"),
    params:
        # The sheet names the inputs: a cohort's paths would overflow the command line.
        samples=lambda wc: config["cohorts"][wc.cancer_type],
        levels=qc_args(measure=False),
        config_hash=config_hash("qc", segment=SEGMENT_SETTINGS, weights=base_weights(), adapt=config["model"]["adapt"]),
    log:
        "logs/qc/{cancer_type}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "(nucseg --no-progress aggregate --sheet {params.samples:q} --out {output.table:q} --regrade {params.levels:q} "
        "--config-hash={params.config_hash} && "
        "nucseg --no-progress publish --sheet {params.samples:q} --dataset results/nuclei "
        "--cancer-type={wildcards.cancer_type:q}) > {log:q} 2>&1"


rule qc_all:
    input:
        expand("results/qc/{cancer_type}.parquet", cancer_type=SELECTED),
    output:
        table="results/qc/slides.parquet",
        grades=report("results/qc/grades.tsv", category="Quality control"),
    params:
        config_hash=config_hash("qc", segment=SEGMENT_SETTINGS, weights=base_weights(), adapt=config["model"]["adapt"]),
    log:
        "logs/qc/all.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress aggregate {input:q} --out {output.table:q} --summary {output.grades:q} "
        "--config-hash={params.config_hash} > {log:q} 2>&1"


# Figures for `snakemake --report`: one rule per figure set, all drawn from the QC tables.
rule report_grades:
    input:
        "results/qc/slides.parquet",
    output:
        report(
            "results/report/grades.html",
            category="Quality control",
            subcategory="Grades",
            labels={"figure": "grade table per cancer type"},
        ),
    log:
        "logs/report/grades.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress report-figures grades --slides {input:q} --out {output:q} > {log:q} 2>&1"


rule report_histograms:
    input:
        "results/qc/slides.parquet",
    output:
        pct=report(
            "results/report/pct_bad_patches.png",
            category="Quality control",
            subcategory="Distributions",
            labels={"figure": "% bad patches per slide"},
        ),
        density=report(
            "results/report/nuclei_density.png",
            category="Quality control",
            subcategory="Distributions",
            labels={"figure": "nuclei per mm² of tissue"},
        ),
    params:
        out_dir="results/report",
    log:
        "logs/report/histograms.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress report-figures histograms --slides {input:q} --out {params.out_dir:q} > {log:q} 2>&1"


rule report_thumbnails:
    """Every Unacceptable slide and a sample of the others: thumbnail, tissue, nuclei, checked patches."""
    input:
        # The overlays come from the segment jobs that slides.parquet already depends on.
        slides="results/qc/slides.parquet",
    output:
        report(
            directory("results/report/thumbnails"),
            patterns=["{grade}/{cancer_type}/{slide_id}.png"],
            category="Slides",
            subcategory="{grade}",
            labels={"slide": "{slide_id}", "cancer type": "{cancer_type}", "grade": "{grade}"},
        ),
    params:
        n=config["report"]["n_thumbnails"],
        levels=qc_args(measure=False),
    log:
        "logs/report/thumbnails.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress report-figures thumbnails --slides {input.slides:q} "
        "--overlay-pattern 'results/{{cancer_type}}/{{slide_id}}/qc_overlay.png' "
        "--out {output:q} --n-thumbnails={params.n} {params.levels:q} > {log:q} 2>&1"
