# Exports of the nuclei: per slide, from its nuclei.parquet. `export: {qupath: true, tcia: true}` adds them to
# `rule all`; `snakemake export_qupath` (export_tcia) builds them for every slide of the built cancer types.
rule qupath_geojson:
    """QuPath GeoJSON (detections with measurements), for File > Import objects or drag and drop."""
    input:
        "results/{cancer_type}/{slide_id}/nuclei.parquet",
    output:
        "results/export/qupath/{cancer_type}/{slide_id}.geojson",
    log:
        "logs/export/qupath/{cancer_type}/{slide_id}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress export {input:q} --format qupath --out {output:q} > {log:q} 2>&1"


rule tcia_csv:
    """The TCIA release's per-tile CSVs (AreaInPixels, PhysicalSize, Polygon), one folder per slide."""
    input:
        "results/{cancer_type}/{slide_id}/nuclei.parquet",
    output:
        directory("results/export/tcia/{cancer_type}/{slide_id}"),
    log:
        "logs/export/tcia/{cancer_type}/{slide_id}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "nucseg --no-progress export {input:q} --format tcia --out {output:q} --slide-id={wildcards.slide_id:q} "
        "> {log:q} 2>&1"
