from ldm.tasks.glyphs.dataset import main

main()
