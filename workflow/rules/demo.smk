# The embedded demo cohort: slides generated here (pyramidal TIFF with mpp), so `make demo` needs no network.
rule demo_slide:
    output:
        "resources/demo/{demo_slide}.tiff",
    params:
        spec=lambda wc: config["demo"]["slides"][wc.demo_slide],
    log:
        "logs/demo/{demo_slide}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress demo-slide {output} --width {params.spec[width]} --height {params.spec[height]} "
        "--mpp {params.spec[mpp]} --seed {params.spec[seed]} > {log} 2>&1"
