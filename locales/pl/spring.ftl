spring-hello = Wiosna już jest, { $first_name }! Chcesz kod na wiosenną kolekcję?
spring-btn-yes = Tak, poproszę
spring-btn-no = Nie teraz
spring-code = Twój kod: SPRING15 (15% zniżki do końca maja).
spring-bye = Nie ma sprawy. Będziemy informować.
